//! `store upgrade`: rewrites format-1 and format-2 manifests as format 3
//! (leaf digests, chunk digests = Merkle roots over them), after checking
//! the blob against the chunk digests the manifest already has, so the new
//! digests are only ever derived from bytes the old manifest vouches for.

use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::leaves::{check_leaf_bytes, default_leaf_bytes, leaf_digests_parallel};
use crate::manifest::FORMAT_VERSION;
use crate::store::Store;
use crate::sys::LockKind;

/// What [`Store::upgrade`] did to one blob's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// Rewritten in format 3 from format `from`, with leaves of this many bytes.
    Rewritten { from: u32, leaf_bytes: u64 },
    /// Already format 3 with leaves of this size: left alone.
    AlreadyCurrent { leaf_bytes: u64 },
}

impl Store {
    /// Rewrites the manifest of `d` in format 3 with leaves of `leaf_bytes`
    /// (`None`: the leaf size it has, else the default for its chunk size).
    /// Every chunk is checked first, on `threads` threads, by the
    /// manifest's own definition of its chunk digests; a corrupt blob is
    /// refused and its manifest left as it was. The new manifest replaces
    /// the old atomically.
    pub fn upgrade(&self, d: &Digest, leaf_bytes: Option<u64>, threads: usize) -> Result<Upgrade> {
        let _lock = self.lock(LockKind::Shared)?;
        let blob = self.open_blob(d)?;
        let m = blob.manifest();
        let leaf_bytes = leaf_bytes
            .or_else(|| m.leaves().map(|(l, _)| l))
            .unwrap_or_else(|| default_leaf_bytes(m.chunk_bytes()));
        check_leaf_bytes(leaf_bytes, m.chunk_bytes())?;
        if m.format() == FORMAT_VERSION && m.leaves().map(|(l, _)| l) == Some(leaf_bytes) {
            return Ok(Upgrade::AlreadyCurrent { leaf_bytes });
        }
        let size = m.size_bytes();
        if blob.bytes().len() as u64 != size {
            return Err(StoreError::Corrupt {
                digest: *d,
                detail: format!("{} bytes on disk, manifest says {size}", blob.bytes().len()),
            });
        }
        let (bad, leaves) = std::thread::scope(|s| {
            let leaves = s.spawn(|| leaf_digests_parallel(blob.bytes(), leaf_bytes, threads.div_ceil(2)));
            let bad = blob.bad_chunks(threads.div_ceil(2), &|_| {});
            (bad, leaves.join().expect("leaf threads do not panic"))
        });
        if let Some(first) = bad.first() {
            return Err(StoreError::Corrupt {
                digest: *d,
                detail: format!("{} bad chunk(s), first chunk {first}; manifest not upgraded", bad.len()),
            });
        }
        let from = m.format();
        let rec = m.record().into_format3(leaf_bytes, leaves);
        self.write_manifest_bytes(d, &rec.encode())?;
        Ok(Upgrade::Rewritten { from, leaf_bytes })
    }
}
