//! Chunk digests of files from outside the store (tests, `gpu load
//! --file`): what a manifest holds, computed here.

use std::path::{Path, PathBuf};

use crate::stream::{BlobSpec, THREADS_MAX};
use crate::KernelError;

/// Chunk digests of a file, hashed on `threads` threads: what a manifest
/// holds, for blobs that come from outside the store (tests, `--file`). The
/// store's own chunk hashing, so both sides agree by construction.
pub fn hash_chunks(path: &Path, chunk_bytes: u64, threads: usize) -> Result<(u64, Vec<[u8; 32]>), KernelError> {
    if chunk_bytes == 0 {
        return Err(KernelError::Spec {
            path: path.to_path_buf(),
            detail: "chunk_bytes is 0".into(),
        });
    }
    let map = map(path)?;
    let threads = threads.clamp(1, THREADS_MAX);
    Ok((
        map.len() as u64,
        cnse_store::chunk_digests_parallel(&map, chunk_bytes, threads),
    ))
}

/// Whole-file SHA-256 (what `sha256sum` prints), by the store's hashing.
pub fn hash_file(path: &Path) -> Result<[u8; 32], KernelError> {
    Ok(cnse_store::sha256_stream(&map(path)?, &mut |_| {}).0)
}

fn map(path: &Path) -> Result<memmap2::Mmap, KernelError> {
    // SAFETY: read-only private mapping of a file this process only reads;
    // see `Streamer::load` for the truncation caveat.
    unsafe { cnse_store::map_file(path) }.map_err(|e| KernelError::Spec {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

/// Owned form of a `BlobSpec`, for callers that build the manifest here.
#[derive(Clone, Debug)]
pub struct OwnedSpec {
    pub path: PathBuf,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub chunk_digests: Vec<[u8; 32]>,
    pub digest: [u8; 32],
}

impl OwnedSpec {
    /// Hashes `path` (chunks in parallel, whole file alongside).
    pub fn from_file(path: &Path, chunk_bytes: u64, threads: usize) -> Result<Self, KernelError> {
        let (whole, chunks) = std::thread::scope(|s| {
            let whole = s.spawn(|| hash_file(path));
            let chunks = hash_chunks(path, chunk_bytes, threads.saturating_sub(1).max(1));
            (whole.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), chunks)
        });
        let (size_bytes, chunk_digests) = chunks?;
        Ok(Self {
            path: path.to_path_buf(),
            size_bytes,
            chunk_bytes,
            chunk_digests,
            digest: whole?,
        })
    }

    pub fn as_spec(&self) -> BlobSpec<'_> {
        BlobSpec {
            path: &self.path,
            size_bytes: self.size_bytes,
            chunk_bytes: self.chunk_bytes,
            chunk_digests: &self.chunk_digests,
            digest: self.digest,
        }
    }
}
