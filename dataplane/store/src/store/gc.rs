//! Listing, removal and LRU eviction of blobs.

use super::*;

impl Store {
    /// Digests of every blob file, sorted; stray names are returned apart.
    pub fn blob_digests(&self) -> Result<(Vec<Digest>, Vec<PathBuf>)> {
        let dir = self.root.join("blobs/sha256");
        let mut digests = Vec::new();
        let mut stray = Vec::new();
        for e in fs::read_dir(&dir).ctx("list", &dir)? {
            let e = e.ctx("list", &dir)?;
            match e.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                Some(d) if e.file_name().len() == 64 => digests.push(d),
                _ => stray.push(e.path()),
            }
        }
        digests.sort();
        Ok((digests, stray))
    }

    /// Every blob with its size, last use, references and manifest facts.
    pub fn list(&self) -> Result<Vec<BlobEntry>> {
        let refs = self.refs()?;
        let (digests, _) = self.blob_digests()?;
        let mut out = Vec::with_capacity(digests.len());
        for d in digests {
            let path = self.blob_path(&d);
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => return Err(e).ctx("stat blob", &path),
            };
            let manifest = Manifest::open(&self.manifest_path(&d), Some(&d)).ok();
            let g = manifest.as_ref().and_then(|m| m.gguf());
            out.push(BlobEntry {
                digest: d,
                size_bytes: meta.len(),
                last_used: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                refs: refs.iter().filter(|r| r.digest == d).cloned().collect(),
                name: manifest.as_ref().map(|m| m.name().to_string()),
                architecture: g.as_ref().and_then(|g| g.architecture.clone()),
                quantization: g.and_then(|g| g.quantization),
            });
        }
        Ok(out)
    }

    fn remove_blob(&self, d: &Digest) -> Result<()> {
        let blob = self.blob_path(d);
        // Blob first: a manifest without its blob is an ignored leftover,
        // a blob without its manifest would be unverifiable.
        fs::remove_file(&blob).ctx("remove blob", &blob)?;
        let man = self.manifest_path(d);
        match fs::remove_file(&man) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).ctx("remove manifest", &man),
            _ => {}
        }
        sys::fsync_dir(blob.parent().expect("parent")).ctx("fsync directory of", &blob)?;
        sys::fsync_dir(man.parent().expect("parent")).ctx("fsync directory of", &man)
    }

    /// Removes a reference (and its blob when no other reference names it,
    /// unless `keep_blob`), or a blob by digest (refused while referenced,
    /// unless `force`, which removes its references too).
    pub fn rm(&self, target: &str, force: bool, keep_blob: bool) -> Result<RmOutcome> {
        let _lock = self.lock(LockKind::Exclusive)?;
        let mut out = RmOutcome::default();
        let refs = self.refs()?;
        let digest = match target.parse::<Digest>() {
            Ok(d) => {
                if !self.has_blob(&d) {
                    return Err(self.not_found(format!("blob {d}")));
                }
                let named: Vec<_> = refs.iter().filter(|r| r.digest == d).collect();
                if !named.is_empty() && !force {
                    let names = named.iter().map(|r| r.name.to_string()).collect::<Vec<_>>().join(", ");
                    return Err(StoreError::Referenced { digest: d, refs: names });
                }
                for r in named {
                    self.remove_ref(&r.name)?;
                    out.refs_removed.push(r.name.clone());
                }
                d
            }
            Err(_) => {
                let r: RefName = target.parse()?;
                let e = self
                    .read_ref(&r)?
                    .ok_or_else(|| self.not_found(format!("reference {r}")))?;
                self.remove_ref(&r)?;
                out.refs_removed.push(r.clone());
                if keep_blob || refs.iter().any(|o| o.digest == e.digest && o.name != r) {
                    return Ok(out);
                }
                e.digest
            }
        };
        if self.has_blob(&digest) {
            self.remove_blob(&digest)?;
            out.blob_removed = Some(digest);
        }
        Ok(out)
    }

    /// Removes leftovers (temporary files of dead writers, manifests without
    /// blobs) and, with a budget, evicts least recently used blobs until the
    /// store holds at most `max_bytes`: unreferenced blobs first, then blobs
    /// named only by unpinned references (which go with them). A blob named
    /// by a pinned reference is never evicted. `partials` also drops
    /// resumable pull downloads.
    pub fn gc(&self, max_bytes: Option<u64>, partials: bool) -> Result<GcReport> {
        let _lock = self.lock(LockKind::Exclusive)?;
        let mut report = GcReport::default();
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).ctx("list", &tmp)? {
            let e = e.ctx("list", &tmp)?;
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let is_partial = name.starts_with("pull-");
            // A pull's state file goes with its partial file, whose flock
            // tells whether the pull is alive.
            let lock_path = match name.strip_suffix(".state") {
                Some(stem) if is_partial => tmp.join(format!("{stem}.partial")),
                _ => path.clone(),
            };
            let Ok(f) = OpenOptions::new().read(true).open(&path) else {
                continue;
            };
            // A live writer holds its flock; a killed one's is gone.
            if let Ok(l) = OpenOptions::new().read(true).open(&lock_path) {
                if sys::flock(&l, LockKind::Exclusive, false).is_err() {
                    continue;
                }
            }
            if is_partial && !partials {
                report.partial_bytes_kept += f.metadata().map(|m| m.len()).unwrap_or(0);
                continue;
            }
            if fs::remove_file(&path).is_ok() {
                report.temp_files_removed += 1;
            }
        }
        let mdir = self.root.join("manifests/sha256");
        for e in fs::read_dir(&mdir).ctx("list", &mdir)? {
            let e = e.ctx("list", &mdir)?;
            let orphan = match e.file_name().to_str().and_then(|n| n.parse::<Digest>().ok()) {
                Some(d) => !self.has_blob(&d),
                None => true,
            };
            if orphan && fs::remove_file(e.path()).is_ok() {
                report.orphan_manifests_removed += 1;
            }
        }

        let mut entries = self.list()?;
        let cost = |e: &BlobEntry| e.size_bytes + fs::metadata(self.manifest_path(&e.digest)).map_or(0, |m| m.len());
        report.bytes_before = entries.iter().map(cost).sum();
        let mut total = report.bytes_before;
        if let Some(max) = max_bytes {
            entries.retain(|e| !e.pinned());
            // Unreferenced before referenced, then least recently used first.
            entries.sort_by_key(|e| (!e.refs.is_empty(), e.last_used));
            for e in entries {
                if total <= max {
                    break;
                }
                let c = cost(&e);
                let mut names = Vec::new();
                for r in &e.refs {
                    self.remove_ref(&r.name)?;
                    names.push(r.name.clone());
                }
                self.remove_blob(&e.digest)?;
                total -= c;
                report.evicted.push((e.digest, e.size_bytes, names));
            }
            if total > max {
                report.pinned_over_budget_bytes = total;
            }
        }
        report.bytes_after = total;
        Ok(report)
    }
}
