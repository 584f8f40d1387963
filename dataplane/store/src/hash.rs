//! SHA-256 over mapped bytes: one sequential stream for the whole-file digest
//! (what `sha256sum` prints) and independent per-chunk digests that many
//! threads check at once and that name the exact bad chunk.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use ring::digest::{Context, SHA256};

use crate::digest::{from_ring, Digest, DIGEST_BYTES};
use crate::merkle::{ChunkHasher, ChunkScheme};

/// Bytes fed to the hasher between progress reports. Large enough that the
/// report costs nothing, small enough that a bar moves smoothly.
pub const HASH_STEP_BYTES: usize = 8 << 20;

/// Number of chunks of `chunk_bytes` that cover `size_bytes` (the last one may
/// be short; zero bytes have zero chunks).
pub fn chunk_count(size_bytes: u64, chunk_bytes: u64) -> u64 {
    assert!(chunk_bytes > 0);
    size_bytes.div_ceil(chunk_bytes)
}

/// Byte range of chunk `index` in a blob of `size_bytes`.
pub fn chunk_range(index: u64, size_bytes: u64, chunk_bytes: u64) -> Range<u64> {
    let start = index * chunk_bytes;
    assert!(
        start < size_bytes,
        "chunk {index} starts past the end ({size_bytes} bytes)"
    );
    start..(start + chunk_bytes).min(size_bytes)
}

/// Whole-stream SHA-256 of `data`, reporting progress in bytes.
pub fn sha256_stream(data: &[u8], progress: &mut dyn FnMut(u64)) -> Digest {
    let mut ctx = Context::new(&SHA256);
    for piece in data.chunks(HASH_STEP_BYTES) {
        ctx.update(piece);
        progress(piece.len() as u64);
    }
    from_ring(ctx.finish())
}

/// Maps a file read-only with sequential read-ahead, for hashing it.
///
/// # Safety
///
/// The file must not be truncated while the map lives (a read past the new
/// end is SIGBUS); a file changed in place makes the digest meaningless but
/// is not undefined behaviour for `&[u8]` readers that only hash.
pub unsafe fn map_file(path: &std::path::Path) -> crate::Result<memmap2::Mmap> {
    use crate::error::IoContext;
    let f = std::fs::File::open(path).ctx("open", path)?;
    // SAFETY: the caller guarantees the file keeps its length.
    let map = unsafe { memmap2::Mmap::map(&f) }.ctx("map", path)?;
    let _ = map.advise(memmap2::Advice::Sequential);
    Ok(map)
}

/// The digest of one chunk by `scheme`: its plain SHA-256 (formats 1 and
/// 2) or the Merkle root over its leaves (format 3, `merkle.rs`).
pub fn chunk_digest(chunk: &[u8], scheme: ChunkScheme) -> [u8; DIGEST_BYTES] {
    match scheme {
        ChunkScheme::Plain => Digest::of(chunk).0,
        ChunkScheme::Merkle { .. } => {
            let mut h = ChunkHasher::new(scheme);
            h.update(chunk);
            h.finish()
        }
    }
}

/// Whether `chunk` hashes to `expected` by `scheme`.
pub fn verify_chunk(chunk: &[u8], scheme: ChunkScheme, expected: &[u8; DIGEST_BYTES]) -> bool {
    // Digests are public; a constant-time compare buys nothing here.
    &chunk_digest(chunk, scheme) == expected
}

/// Threads to use when the caller does not say: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Per-chunk digests of `data` by `scheme`, computed on `threads` threads.
pub fn chunk_digests_parallel(
    data: &[u8],
    chunk_bytes: u64,
    scheme: ChunkScheme,
    threads: usize,
) -> Vec<[u8; DIGEST_BYTES]> {
    let size_bytes = data.len() as u64;
    let count = chunk_count(size_bytes, chunk_bytes) as usize;
    let out = Mutex::new(vec![[0u8; DIGEST_BYTES]; count]);
    for_each_chunk(count, threads, |i| {
        let r = chunk_range(i as u64, size_bytes, chunk_bytes);
        let d = chunk_digest(&data[r.start as usize..r.end as usize], scheme);
        out.lock().unwrap_or_else(|p| p.into_inner())[i] = d;
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Checks every chunk of a blob of `size_bytes` against `expected` (by
/// `scheme`) on `threads` threads and returns the indices of bad chunks, ascending. A chunk
/// that `data` does not fully hold (a truncated file) is bad. `progress` gets
/// the byte count of each chunk as it is finished, from any thread.
pub fn verify_chunks_parallel(
    data: &[u8],
    size_bytes: u64,
    chunk_bytes: u64,
    scheme: ChunkScheme,
    expected: &[[u8; DIGEST_BYTES]],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Vec<u64> {
    let count = chunk_count(size_bytes, chunk_bytes) as usize;
    assert_eq!(count, expected.len(), "manifest chunk count disagrees with its size");
    let bad = Mutex::new(Vec::new());
    for_each_chunk(count, threads, |i| {
        let r = chunk_range(i as u64, size_bytes, chunk_bytes);
        let ok =
            r.end <= data.len() as u64 && verify_chunk(&data[r.start as usize..r.end as usize], scheme, &expected[i]);
        if !ok {
            bad.lock().unwrap_or_else(|p| p.into_inner()).push(i as u64);
        }
        progress(r.end - r.start);
    });
    let mut bad = bad.into_inner().unwrap_or_else(|p| p.into_inner());
    bad.sort_unstable();
    bad
}

/// Runs `f(i)` for every `i < count` on up to `threads` scoped threads; each
/// thread takes the next index from a shared counter so slow chunks (cold
/// pages) do not hold the others back.
fn for_each_chunk(count: usize, threads: usize, f: impl Fn(usize) + Sync) {
    let threads = threads.clamp(1, count.max(1));
    let next = AtomicUsize::new(0);
    let work = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= count {
            break;
        }
        f(i);
    };
    if threads == 1 {
        work();
        return;
    }
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn stream_digest_equals_one_shot() {
        let d = data(HASH_STEP_BYTES * 2 + 17);
        let mut seen = 0;
        assert_eq!(sha256_stream(&d, &mut |n| seen += n), Digest::of(&d));
        assert_eq!(seen, d.len() as u64);
    }

    #[test]
    fn chunk_geometry() {
        assert_eq!(chunk_count(0, 4096), 0);
        assert_eq!(chunk_count(1, 4096), 1);
        assert_eq!(chunk_count(4096, 4096), 1);
        assert_eq!(chunk_count(4097, 4096), 2);
        assert_eq!(chunk_range(1, 4097, 4096), 4096..4097);
    }

    #[test]
    fn parallel_verify_names_each_bad_chunk() {
        let d = data(10 * 4096 + 5);
        let size = d.len() as u64;
        for scheme in [ChunkScheme::Plain, ChunkScheme::Merkle { leaf_bytes: 1024 }] {
            let mut d = d.clone();
            let sums = chunk_digests_parallel(&d, 4096, scheme, 3);
            assert_eq!(sums.len(), 11);
            assert_eq!(sums, chunk_digests_parallel(&d, 4096, scheme, 1));
            for threads in 1..=4 {
                assert!(verify_chunks_parallel(&d, size, 4096, scheme, &sums, threads, &|_| {}).is_empty());
            }
            d[4096 * 3 + 9] ^= 1;
            d[4096 * 10 + 4] ^= 0x80;
            assert_eq!(
                verify_chunks_parallel(&d, size, 4096, scheme, &sums, 2, &|_| {}),
                vec![3, 10]
            );
            // Truncated: the last whole chunk and the tail are gone.
            assert_eq!(
                verify_chunks_parallel(&d[..4096 * 9 + 1], size, 4096, scheme, &sums, 2, &|_| {}),
                vec![3, 9, 10]
            );
        }
        // The two schemes give different digests for the same bytes.
        let plain = chunk_digests_parallel(&d, 4096, ChunkScheme::Plain, 1);
        let tree = chunk_digests_parallel(&d, 4096, ChunkScheme::Merkle { leaf_bytes: 4096 }, 1);
        assert!(plain.iter().zip(&tree).all(|(p, t)| p != t));
        // A format-3 chunk digest is the root over the leaf digests.
        let leaves = crate::leaves::leaf_digests_parallel(&d, 1024, 2);
        let roots = crate::merkle::chunk_roots(&leaves, 4);
        assert_eq!(
            roots,
            chunk_digests_parallel(&d, 4096, ChunkScheme::Merkle { leaf_bytes: 1024 }, 2)
        );
    }
}
