//! Chunk digests of files from outside the store (tests, `gpu load
//! --file`): what a manifest holds, computed here.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ring::digest::{Context as Sha256, SHA256};

use crate::stream::{BlobSpec, THREADS_MAX};
use crate::KernelError;

/// Chunk digests of a file, hashed on `threads` threads: what a manifest
/// holds, for blobs that come from outside the store (tests, `--file`).
pub fn hash_chunks(path: &Path, chunk_bytes: u64, threads: usize) -> Result<(u64, Vec<[u8; 32]>), KernelError> {
    let io = |op: &'static str| {
        move |source| KernelError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    if chunk_bytes == 0 {
        return Err(KernelError::Spec {
            path: path.to_path_buf(),
            detail: "chunk_bytes is 0".into(),
        });
    }
    let file = File::open(path).map_err(io("open"))?;
    let len = file.metadata().map_err(io("stat"))?.len();
    let chunks = len.div_ceil(chunk_bytes) as usize;
    let mut digests = vec![[0u8; 32]; chunks];
    if chunks == 0 {
        return Ok((0, digests));
    }
    // SAFETY: read-only private mapping of a file this process only reads;
    // see `Streamer::load` for the truncation caveat.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io("mmap"))?;
    let next = AtomicUsize::new(0);
    let out = Mutex::new(&mut digests);
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, THREADS_MAX).min(chunks) {
            s.spawn(|| loop {
                let c = next.fetch_add(1, Ordering::Relaxed);
                if c >= chunks {
                    break;
                }
                let start = c as u64 * chunk_bytes;
                let end = (start + chunk_bytes).min(len);
                let d = ring::digest::digest(&SHA256, &map[start as usize..end as usize]);
                out.lock().unwrap_or_else(|p| p.into_inner())[c].copy_from_slice(d.as_ref());
            });
        }
    });
    Ok((len, digests))
}

/// Whole-file SHA-256 (sequential; what `sha256sum` prints).
pub fn hash_file(path: &Path) -> Result<[u8; 32], KernelError> {
    use std::io::Read;
    let io = |op: &'static str| {
        move |source| KernelError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = File::open(path).map_err(io("open"))?;
    let mut ctx = Sha256::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io("read"))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
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
