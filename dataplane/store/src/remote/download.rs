//! A pull in progress: the partial file, its resume state, and the rate limit.

use super::*;

/// Sleeps as needed to keep the average rate at or under a limit.
pub(super) struct RateLimit {
    limit_bytes_per_s: Option<u64>,
    start: Instant,
    bytes: u64,
}

impl RateLimit {
    pub(super) fn new(limit_bytes_per_s: Option<u64>) -> RateLimit {
        RateLimit {
            limit_bytes_per_s,
            start: Instant::now(),
            bytes: 0,
        }
    }
    pub(super) fn account(&mut self, n: u64) {
        let Some(limit) = self.limit_bytes_per_s else { return };
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / limit as f64);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// An in-progress download: the partial file and its per-chunk state.
///
/// State file: magic, size_bytes, chunk_bytes, then one byte per chunk (1 =
/// verified and fsynced in the partial file). A chunk's byte is set only
/// after its data is durable, so the state never claims more than the disk
/// holds; losing a state byte only costs fetching that chunk again.
pub(super) struct Download {
    partial: File,
    partial_path: PathBuf,
    state: File,
    state_path: PathBuf,
    done: Vec<bool>,
}

impl Download {
    pub(super) fn open(store: &Store, m: &Manifest) -> Result<Download> {
        let hex = m.digest().hex();
        let partial_path = store.tmp_dir().join(format!("pull-{hex}.partial"));
        let state_path = store.tmp_dir().join(format!("pull-{hex}.state"));
        let partial = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&partial_path)
            .ctx("open", &partial_path)?;
        sys::flock(&partial, LockKind::Exclusive, false).map_err(|_| StoreError::BadInput {
            path: partial_path.clone(),
            reason: format!("another pull of {} is in progress", m.digest()),
        })?;
        let state = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&state_path)
            .ctx("open", &state_path)?;
        let n = m.chunk_count() as usize;
        let mut header = Vec::with_capacity(STATE_HEADER_BYTES as usize);
        header.extend_from_slice(&STATE_MAGIC);
        header.extend_from_slice(&m.size_bytes().to_le_bytes());
        header.extend_from_slice(&m.chunk_bytes().to_le_bytes());
        let mut existing = Vec::new();
        (&state)
            .take(STATE_HEADER_BYTES + n as u64 + 1)
            .read_to_end(&mut existing)
            .ctx("read", &state_path)?;
        let partial_len = partial.metadata().ctx("stat", &partial_path)?.len();
        let done = if existing.len() == STATE_HEADER_BYTES as usize + n
            && existing[..STATE_HEADER_BYTES as usize] == header[..]
            && partial_len == m.size_bytes()
        {
            existing[STATE_HEADER_BYTES as usize..]
                .iter()
                .map(|&b| b == 1)
                .collect()
        } else {
            // No usable earlier run: start clean.
            partial.set_len(0).ctx("truncate", &partial_path)?;
            partial.set_len(m.size_bytes()).ctx("size", &partial_path)?;
            state.set_len(0).ctx("truncate", &state_path)?;
            header.resize(STATE_HEADER_BYTES as usize + n, 0);
            state.write_all_at(&header, 0).ctx("write", &state_path)?;
            state.sync_all().ctx("fsync", &state_path)?;
            vec![false; n]
        };
        Ok(Download {
            partial,
            partial_path,
            state,
            state_path,
            done,
        })
    }

    pub(super) fn done_bytes(&self, m: &Manifest) -> u64 {
        self.done
            .iter()
            .enumerate()
            .filter(|(_, d)| **d)
            .map(|(i, _)| {
                let r = chunk_range(i as u64, m.size_bytes(), m.chunk_bytes());
                r.end - r.start
            })
            .sum()
    }

    /// Maximal runs `(first, last)` of chunks not yet done.
    pub(super) fn missing_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < self.done.len() {
            if self.done[i] {
                i += 1;
                continue;
            }
            let first = i;
            while i < self.done.len() && !self.done[i] {
                i += 1;
            }
            runs.push((first as u64, i as u64 - 1));
        }
        runs
    }

    pub(super) fn write_piece(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.partial
            .write_all_at(bytes, offset)
            .ctx("write", &self.partial_path)
    }

    /// Records chunk `i` as verified, after making its bytes durable.
    pub(super) fn mark_done(&mut self, i: u64) -> Result<()> {
        self.partial.sync_data().ctx("fsync", &self.partial_path)?;
        self.state
            .write_all_at(&[1], STATE_HEADER_BYTES + i)
            .ctx("write", &self.state_path)?;
        self.done[i as usize] = true;
        Ok(())
    }

    /// Checks the whole-file digest (the manifest came from the remote and
    /// must not be trusted alone), then moves the blob and manifest in.
    pub(super) fn commit(self, store: &Store, m: &Manifest) -> Result<()> {
        assert!(self.done.iter().all(|d| *d), "commit before every chunk is done");
        let digest = m.digest();
        // SAFETY: the partial file is ours (flocked, mode 0600) and keeps its
        // size while mapped.
        let map = unsafe { Mmap::map(&self.partial) }.ctx("map", &self.partial_path)?;
        // Leaf digests are computed here from the bytes (never taken from
        // the remote), on the cores the sequential whole-file digest leaves
        // idle, so they cost no time; the format-3 chunk digests follow
        // from them. A format-3 remote manifest keeps its leaf size.
        let leaf_bytes = match m.chunk_scheme() {
            ChunkScheme::Merkle { leaf_bytes } => leaf_bytes,
            ChunkScheme::Plain => crate::leaves::default_leaf_bytes(m.chunk_bytes()),
        };
        let threads = hash::default_threads().saturating_sub(1).max(1);
        let (got, leaves) = std::thread::scope(|s| {
            let leaves = s.spawn(|| crate::leaves::leaf_digests_parallel(&map, leaf_bytes, threads));
            let got = hash::sha256_stream(&map, &mut |_| {});
            (got, leaves.join().expect("leaf threads do not panic"))
        });
        drop(map);
        if got != digest {
            let _ = fs::remove_file(&self.partial_path);
            let _ = fs::remove_file(&self.state_path);
            return Err(StoreError::RemoteCorrupt {
                digest,
                detail: format!("every chunk matches the remote manifest but the whole file hashes to {got}"),
            });
        }
        let _lock = store.lock(LockKind::Shared)?;
        self.partial
            .set_permissions(fs::Permissions::from_mode(0o444))
            .ctx("chmod", &self.partial_path)?;
        self.partial.sync_all().ctx("fsync", &self.partial_path)?;
        let rec = m.record().into_format3(leaf_bytes, leaves);
        if m.chunk_scheme() != ChunkScheme::Plain && rec.chunk_digests != m.chunk_digests() {
            // Every chunk matched the remote's roots, so this cannot happen
            // short of a bug; never store a manifest that disagrees.
            return Err(StoreError::RemoteCorrupt {
                digest,
                detail: "the leaves of the downloaded bytes do not give the remote manifest's chunk digests".into(),
            });
        }
        store.write_manifest_bytes(&digest, &rec.encode())?;
        let dest = store.blob_path(&digest);
        fs::rename(&self.partial_path, &dest).ctx("rename into place", &dest)?;
        sys::fsync_dir(dest.parent().expect("parent")).ctx("fsync directory of", &dest)?;
        let _ = fs::remove_file(&self.state_path);
        Ok(())
    }
}
