//! Chunk and leaf digests of files from outside the store (tests, `gpu
//! load --file`): what a manifest holds, computed here by the store's own
//! hashing and Merkle tree, so both sides agree by construction.

use std::path::{Path, PathBuf};

use cnse_store::ChunkScheme;

use crate::stream::{BlobSpec, THREADS_MAX};
use crate::KernelError;

/// Plain (format-2 style) chunk digests of a file, hashed on `threads`
/// threads, for blobs that come from outside the store (tests, `--file`).
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
        cnse_store::chunk_digests_parallel(&map, chunk_bytes, ChunkScheme::Plain, threads),
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
    /// How the chunk digests are defined (plain, or Merkle over leaves).
    pub scheme: ChunkScheme,
    pub digest: [u8; 32],
}

impl OwnedSpec {
    /// Hashes `path` (plain chunk digests in parallel, whole file alongside).
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
            scheme: ChunkScheme::Plain,
            digest: whole?,
        })
    }

    /// Hashes `path` as `store put` does (format 3): leaf digests of
    /// `leaf_bytes` in parallel, the whole file alongside, and chunk
    /// digests as the Merkle roots over the leaves. Returns the leaves too.
    pub fn from_file_with_leaves(
        path: &Path,
        chunk_bytes: u64,
        leaf_bytes: u64,
        threads: usize,
    ) -> Result<(Self, Vec<[u8; 32]>), KernelError> {
        if leaf_bytes == 0 || chunk_bytes % leaf_bytes != 0 {
            return Err(KernelError::Spec {
                path: path.to_path_buf(),
                detail: format!("leaf size {leaf_bytes} does not divide the chunk size {chunk_bytes}"),
            });
        }
        let map = map(path)?;
        let threads = threads.clamp(1, THREADS_MAX);
        let (whole, leaves) = std::thread::scope(|s| {
            let whole = s.spawn(|| cnse_store::sha256_stream(&map, &mut |_| {}).0);
            let leaves = cnse_store::leaf_digests_parallel(&map, leaf_bytes, threads.saturating_sub(1).max(1));
            (whole.join().unwrap_or_else(|p| std::panic::resume_unwind(p)), leaves)
        });
        let spec = Self {
            path: path.to_path_buf(),
            size_bytes: map.len() as u64,
            chunk_bytes,
            chunk_digests: cnse_store::merkle::chunk_roots(&leaves, chunk_bytes / leaf_bytes),
            scheme: ChunkScheme::Merkle { leaf_bytes },
            digest: whole,
        };
        Ok((spec, leaves))
    }

    pub fn as_spec(&self) -> BlobSpec<'_> {
        BlobSpec {
            path: &self.path,
            size_bytes: self.size_bytes,
            chunk_bytes: self.chunk_bytes,
            chunk_digests: &self.chunk_digests,
            scheme: self.scheme,
            digest: self.digest,
        }
    }
}
