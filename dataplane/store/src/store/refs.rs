//! `name:tag` references: read, write, pin, list.

use super::*;

impl Store {
    /// Reads a reference; `None` when it does not exist.
    pub fn read_ref(&self, r: &RefName) -> Result<Option<RefEntry>> {
        let path = self.ref_path(r);
        let mut text = String::new();
        match File::open(&path) {
            Ok(f) => f
                .take(REF_FILE_BYTES_MAX)
                .read_to_string(&mut text)
                .ctx("read reference", &path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).ctx("open reference", &path),
        };
        let mut lines = text.lines();
        let digest = lines
            .next()
            .unwrap_or("")
            .parse::<Digest>()
            .map_err(|_| StoreError::BadInput {
                path: path.clone(),
                reason: "reference file does not hold a digest".into(),
            })?;
        let pinned = lines.any(|l| l == "pinned");
        Ok(Some(RefEntry {
            name: r.clone(),
            digest,
            pinned,
        }))
    }

    /// Points `r` at `d` (replacing what it named), pinned or not.
    pub fn set_ref(&self, r: &RefName, d: &Digest, pinned: bool) -> Result<()> {
        let dir = self.root.join("refs").join(r.name());
        fs::create_dir_all(&dir).ctx("create reference directory", &dir)?;
        let text = format!("{d}\n{}", if pinned { "pinned\n" } else { "" });
        self.write_atomic(&self.ref_path(r), text.as_bytes(), 0o644)
    }

    /// Pins or unpins an existing reference.
    pub fn set_pinned(&self, r: &RefName, pinned: bool) -> Result<Digest> {
        let e = self
            .read_ref(r)?
            .ok_or_else(|| self.not_found(format!("reference {r}")))?;
        self.set_ref(r, &e.digest, pinned)?;
        Ok(e.digest)
    }

    pub(super) fn remove_ref(&self, r: &RefName) -> Result<()> {
        let path = self.ref_path(r);
        fs::remove_file(&path).ctx("remove reference", &path)?;
        let dir = path.parent().expect("ref paths have parents");
        // Remove the name's directory when it was its last tag.
        let _ = fs::remove_dir(dir);
        sys::fsync_dir(dir)
            .or_else(|_| sys::fsync_dir(&self.root.join("refs")))
            .ctx("fsync", dir)
    }

    /// Every valid reference, sorted by name.
    pub fn refs(&self) -> Result<Vec<RefEntry>> {
        let mut out = Vec::new();
        let refs_dir = self.root.join("refs");
        for name in fs::read_dir(&refs_dir).ctx("list", &refs_dir)? {
            let name = name.ctx("list", &refs_dir)?;
            let name_dir = name.path();
            if !name_dir.is_dir() {
                continue;
            }
            for tag in fs::read_dir(&name_dir).ctx("list", &name_dir)? {
                let tag = tag.ctx("list", &name_dir)?;
                let (n, t) = (name.file_name(), tag.file_name());
                let (Some(n), Some(t)) = (n.to_str(), t.to_str()) else {
                    continue;
                };
                let Ok(r) = RefName::new(n, t) else { continue };
                if let Some(e) = self.read_ref(&r)? {
                    out.push(e);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}
