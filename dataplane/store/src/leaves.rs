//! Leaf digests: SHA-256 of fixed-size leaves under each chunk, so a GPU can
//! check a chunk with one thread per leaf (SHA-256 is sequential within a
//! message, so one digest per 16 MiB chunk gives a GPU too few threads).
//!
//! Leaf `i` of a blob is bytes `i * leaf_bytes .. min((i + 1) * leaf_bytes,
//! size)`. `leaf_bytes` is a power of two that divides the chunk size, so no
//! leaf crosses a chunk and chunk `c` holds leaves `c * chunk_bytes /
//! leaf_bytes ..`; only the blob's last leaf may be short.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::digest::{Digest, DIGEST_BYTES};
use crate::error::{Result, StoreError};

/// Default leaf: 64 KiB, 32 B of digest per 64 KiB of blob (0.05 %, 512 KiB
/// per GiB), and 256 leaves (GPU threads) per 16 MiB chunk. Chosen from the
/// kernel sweep in docs/GPU.md.
pub const LEAF_BYTES_DEFAULT: u64 = 64 << 10;
pub const LEAF_BYTES_MIN: u64 = 4096;
/// A leaf is hashed by one GPU thread; above this the thread count is too
/// small to matter and the kernel's 32-bit leaf length would not hold it.
pub const LEAF_BYTES_MAX: u64 = 16 << 20;
/// Leaves hashed per work item of the CPU pass (1 MiB at the default).
const LEAVES_PER_TASK: usize = 16;

/// Checks that `leaf_bytes` is a power of two in range dividing `chunk_bytes`.
pub fn check_leaf_bytes(leaf_bytes: u64, chunk_bytes: u64) -> Result<()> {
    let ok = leaf_bytes.is_power_of_two()
        && (LEAF_BYTES_MIN..=LEAF_BYTES_MAX).contains(&leaf_bytes)
        && chunk_bytes % leaf_bytes == 0;
    if !ok {
        return Err(StoreError::BadOption {
            option: "--leaf-bytes",
            reason: format!(
                "{leaf_bytes} is not a power of two between {LEAF_BYTES_MIN} and {LEAF_BYTES_MAX} \
                 that divides the chunk size {chunk_bytes}"
            ),
        });
    }
    Ok(())
}

/// The default leaf for a chunk size: the largest power of two up to
/// [`LEAF_BYTES_DEFAULT`] that divides it (chunks are multiples of 4 KiB).
pub fn default_leaf_bytes(chunk_bytes: u64) -> u64 {
    let mut leaf = LEAF_BYTES_DEFAULT;
    while chunk_bytes % leaf != 0 {
        leaf /= 2;
    }
    leaf.max(LEAF_BYTES_MIN)
}

/// Leaves of `leaf_bytes` covering `size_bytes` (zero bytes have none).
pub fn leaf_count(size_bytes: u64, leaf_bytes: u64) -> u64 {
    assert!(leaf_bytes > 0);
    size_bytes.div_ceil(leaf_bytes)
}

/// Leaf digests of `data` on `threads` threads, each thread taking the next
/// run of leaves from a shared counter.
pub fn leaf_digests_parallel(data: &[u8], leaf_bytes: u64, threads: usize) -> Vec<[u8; DIGEST_BYTES]> {
    assert!(leaf_bytes > 0);
    let leaf = leaf_bytes as usize;
    let count = leaf_count(data.len() as u64, leaf_bytes) as usize;
    let tasks = count.div_ceil(LEAVES_PER_TASK);
    let out = Mutex::new(vec![[0u8; DIGEST_BYTES]; count]);
    let next = AtomicUsize::new(0);
    let work = || {
        let mut local = Vec::with_capacity(LEAVES_PER_TASK);
        loop {
            let t = next.fetch_add(1, Ordering::Relaxed);
            if t >= tasks {
                break;
            }
            let first = t * LEAVES_PER_TASK;
            let last = (first + LEAVES_PER_TASK).min(count);
            local.clear();
            for i in first..last {
                let end = ((i + 1) * leaf).min(data.len());
                local.push(Digest::of(&data[i * leaf..end]).0);
            }
            out.lock().unwrap_or_else(|p| p.into_inner())[first..last].copy_from_slice(&local);
        }
    };
    let threads = threads.clamp(1, tasks.max(1));
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Indices of the leaves of `data` that do not hash to `expected`
/// (ascending); a leaf that `data` does not fully hold is bad.
pub fn bad_leaves(data: &[u8], size_bytes: u64, leaf_bytes: u64, expected: &[[u8; DIGEST_BYTES]]) -> Vec<u64> {
    let count = leaf_count(size_bytes, leaf_bytes);
    assert_eq!(count, expected.len() as u64, "leaf count disagrees with the size");
    (0..count)
        .filter(|&i| {
            let start = i * leaf_bytes;
            let end = (start + leaf_bytes).min(size_bytes);
            end > data.len() as u64 || Digest::of(&data[start as usize..end as usize]).0 != expected[i as usize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_cover_the_blob_and_name_a_flipped_bit() {
        let mut d: Vec<u8> = (0..(37 * 4096 + 100)).map(|i| (i * 31 + i / 97) as u8).collect();
        let sums = leaf_digests_parallel(&d, 4096, 3);
        assert_eq!(sums.len(), 38);
        assert_eq!(sums, leaf_digests_parallel(&d, 4096, 1));
        assert_eq!(sums[37], Digest::of(&d[37 * 4096..]).0);
        assert!(bad_leaves(&d, d.len() as u64, 4096, &sums).is_empty());
        d[5 * 4096 + 7] ^= 4;
        assert_eq!(bad_leaves(&d, d.len() as u64, 4096, &sums), vec![5]);
        assert!(leaf_digests_parallel(&[], 4096, 4).is_empty());
    }

    #[test]
    fn leaf_size_must_divide_the_chunk() {
        assert!(check_leaf_bytes(64 << 10, 16 << 20).is_ok());
        assert!(check_leaf_bytes(48 << 10, 16 << 20).is_err());
        assert!(check_leaf_bytes(2048, 16 << 20).is_err());
        assert!(check_leaf_bytes(64 << 10, 4096).is_err());
        assert!(check_leaf_bytes(32 << 20, 1 << 30).is_err());
    }
}
