//! `store upgrade`: gives existing manifests leaf digests (format 2), after
//! checking the blob against the chunk digests it already has, so leaves are
//! only ever derived from bytes the manifest vouches for.

use crate::digest::Digest;
use crate::error::{Result, StoreError};
use crate::leaves::{check_leaf_bytes, default_leaf_bytes, leaf_digests_parallel};
use crate::store::Store;
use crate::sys::LockKind;

/// What [`Store::upgrade`] did to one blob's manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// Rewritten with leaves of this many bytes.
    Rewritten { leaf_bytes: u64 },
    /// Already format 2 with leaves of this size: left alone.
    AlreadyCurrent { leaf_bytes: u64 },
}

impl Store {
    /// Rewrites the manifest of `d` with leaf digests of `leaf_bytes`
    /// (`None`: the default for its chunk size). Every chunk is checked
    /// first, on `threads` threads; a corrupt blob is refused and its
    /// manifest left as it was. The new manifest replaces the old atomically.
    pub fn upgrade(&self, d: &Digest, leaf_bytes: Option<u64>, threads: usize) -> Result<Upgrade> {
        let _lock = self.lock(LockKind::Shared)?;
        let blob = self.open_blob(d)?;
        let m = blob.manifest();
        let leaf_bytes = leaf_bytes.unwrap_or_else(|| default_leaf_bytes(m.chunk_bytes()));
        check_leaf_bytes(leaf_bytes, m.chunk_bytes())?;
        let on_disk_current = std::fs::read(self.manifest_path(d))
            .map(|b| b.starts_with(&crate::manifest::MANIFEST_MAGIC))
            .unwrap_or(false);
        if on_disk_current && m.leaves().map(|(l, _)| l) == Some(leaf_bytes) {
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
        let rec = m.record().with_leaves(leaf_bytes, leaves);
        self.write_manifest_bytes(d, &rec.encode())?;
        Ok(Upgrade::Rewritten { leaf_bytes })
    }
}
