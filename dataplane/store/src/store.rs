//! The local blob store: a directory of blobs named by their SHA-256,
//! manifests beside them, `name:tag` references, and an LRU byte budget.
//!
//! ```text
//! DIR/lock                         flock: shared for put/pull, exclusive for rm/gc
//! DIR/blobs/sha256/<hex>           the bytes, read-only; the rename here commits a put
//! DIR/manifests/sha256/<hex>       rkyv manifest, written before the blob is renamed
//! DIR/refs/<name>/<tag>            "sha256:<hex>\n" and an optional "pinned\n"
//! DIR/tmp/                         temporary files, on the same file system
//! ```
//!
//! A blob appears only by rename of a complete, fsynced temporary file, so a
//! reader never sees half a blob, and a crash leaves only a temporary file
//! (removed by `gc`). The blob's mtime records its last use (for LRU).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use memmap2::{Advice, Mmap};

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::gguf;
use crate::hash::{self, chunk_range, verify_chunks_parallel};
use crate::leaves;
use crate::manifest::{check_chunk_bytes, Manifest, ManifestRecord, CHUNK_BYTES_DEFAULT};
use crate::refname::RefName;
use crate::sys::{self, LockKind};

mod gc;
mod refs;
mod source;

use source::write_blob;
pub use source::SourceFile;

/// Bytes copied between progress reports and writeback kicks in `put`.
const COPY_PIECE_BYTES: u64 = 8 << 20;
/// Longest ref file we read.
const REF_FILE_BYTES_MAX: u64 = 256;

/// A content-addressed store rooted at one directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Options of [`Store::put`].
#[derive(Debug, Clone)]
pub struct PutOptions {
    pub name: Option<RefName>,
    pub pin: bool,
    pub chunk_bytes: u64,
    /// Leaf size of the leaf digests; `None`: `default_leaf_bytes(chunk_bytes)`.
    pub leaf_bytes: Option<u64>,
    pub threads: usize,
}

impl Default for PutOptions {
    fn default() -> Self {
        PutOptions {
            name: None,
            pin: false,
            chunk_bytes: CHUNK_BYTES_DEFAULT,
            leaf_bytes: None,
            threads: hash::default_threads(),
        }
    }
}

/// What [`Store::put`] did.
#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub digest: Digest,
    pub size_bytes: u64,
    /// The blob was already in the store; nothing new was written.
    pub existed: bool,
}

/// A reference and where it points.
#[derive(Debug, Clone)]
pub struct RefEntry {
    pub name: RefName,
    pub digest: Digest,
    pub pinned: bool,
}

/// One blob as `ls` shows it.
#[derive(Debug, Clone)]
pub struct BlobEntry {
    pub digest: Digest,
    pub size_bytes: u64,
    pub last_used: SystemTime,
    pub refs: Vec<RefEntry>,
    /// The manifest's name field, when the manifest reads.
    pub name: Option<String>,
    pub architecture: Option<String>,
    pub quantization: Option<String>,
}

impl BlobEntry {
    pub fn pinned(&self) -> bool {
        self.refs.iter().any(|r| r.pinned)
    }
}

/// The result of checking one blob.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub digest: Digest,
    /// Size the manifest records (0 when the manifest is unreadable).
    pub size_bytes: u64,
    pub actual_bytes: u64,
    pub chunk_bytes: u64,
    pub bad_chunks: Vec<u64>,
    /// Whole-file digest check: `None` when not asked for.
    pub full_ok: Option<bool>,
    /// Every problem found, one line each; empty means intact.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What `gc` did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub evicted: Vec<(Digest, u64, Vec<RefName>)>,
    pub temp_files_removed: u64,
    pub orphan_manifests_removed: u64,
    /// Bytes pinned blobs hold when the budget could not be met without them.
    pub pinned_over_budget_bytes: u64,
    /// Resumable pull downloads left in place (`partials` not set).
    pub partial_bytes_kept: u64,
}

/// What `rm` did.
#[derive(Debug, Clone, Default)]
pub struct RmOutcome {
    pub refs_removed: Vec<RefName>,
    pub blob_removed: Option<Digest>,
}

/// A mapped, read-only blob with its manifest.
pub struct Blob {
    map: Mmap,
    manifest: Manifest,
    path: PathBuf,
}

impl Blob {
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Checks every chunk against the manifest on `threads` threads; returns
    /// the bad chunk indices (a short file makes its missing chunks bad).
    pub fn bad_chunks(&self, threads: usize, progress: &(dyn Fn(u64) + Sync)) -> Vec<u64> {
        let m = &self.manifest;
        verify_chunks_parallel(
            self.bytes(),
            m.size_bytes(),
            m.chunk_bytes(),
            m.chunk_scheme(),
            m.chunk_digests(),
            threads,
            progress,
        )
    }
}

/// An open temporary file in `DIR/tmp`, flocked while alive so `gc` can tell
/// live ones from leftovers, and removed on drop unless persisted.
pub(crate) struct TempFile {
    pub file: File,
    pub path: PathBuf,
    keep: bool,
}

impl TempFile {
    pub fn persist(mut self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).ctx("rename into place", dest)?;
        self.keep = true;
        sys::fsync_dir(dest.parent().expect("store paths have parents")).ctx("fsync directory of", dest)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A held store lock; released when dropped (the fd closes).
pub struct StoreLock {
    _file: File,
}

impl Store {
    /// Opens (creating if needed) the store at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Store> {
        let root = dir.as_ref().to_path_buf();
        for sub in ["blobs/sha256", "manifests/sha256", "refs", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).ctx("create store directory", &p)?;
        }
        Ok(Store { root })
    }

    /// `$XDG_DATA_HOME/cnse-dp/store`, else `~/.local/share/cnse-dp/store`.
    pub fn default_dir() -> PathBuf {
        let data = std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        data.join("cnse-dp/store")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(d.hex())
    }
    pub fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.root.join("manifests/sha256").join(d.hex())
    }
    fn ref_path(&self, r: &RefName) -> PathBuf {
        self.root.join("refs").join(r.name()).join(r.tag())
    }
    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    fn not_found(&self, what: String) -> StoreError {
        StoreError::NotFound {
            what,
            store: self.root.clone(),
        }
    }

    /// Takes the store lock: shared for adding, exclusive for removing.
    pub fn lock(&self, kind: LockKind) -> Result<StoreLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ctx("open lock", &path)?;
        sys::flock(&file, kind, true).ctx("lock", &path)?;
        Ok(StoreLock { _file: file })
    }

    /// Creates a locked temporary file `DIR/tmp/<prefix>-<pid>-<n>`.
    pub(crate) fn temp_file(&self, prefix: &str) -> Result<TempFile> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for attempt in 0..100u32 {
            let path = self
                .tmp_dir()
                .join(format!("{prefix}-{}-{nanos}-{attempt}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(file) => {
                    sys::flock(&file, LockKind::Exclusive, false).ctx("lock temporary file", &path)?;
                    return Ok(TempFile {
                        file,
                        path,
                        keep: false,
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).ctx("create temporary file", &path),
            }
        }
        Err(StoreError::Io {
            op: "create temporary file",
            path: self.tmp_dir(),
            error: io::Error::from(io::ErrorKind::AlreadyExists),
        })
    }

    /// Writes `bytes` to `dest` atomically: temporary file, fsync, rename,
    /// fsync of the directory.
    pub(crate) fn write_atomic(&self, dest: &Path, bytes: &[u8], mode: u32) -> Result<()> {
        let mut tmp = self.temp_file("write")?;
        tmp.file.write_all(bytes).ctx("write", &tmp.path)?;
        tmp.file
            .set_permissions(fs::Permissions::from_mode(mode))
            .ctx("chmod", &tmp.path)?;
        tmp.file.sync_all().ctx("fsync", &tmp.path)?;
        tmp.persist(dest)
    }

    /// Writes a manifest file for `d` atomically.
    pub(crate) fn write_manifest_bytes(&self, d: &Digest, bytes: &[u8]) -> Result<()> {
        self.write_atomic(&self.manifest_path(d), bytes, 0o444)
    }

    /// Resolves `sha256:HEX`, bare `HEX` or `name[:tag]` to the digest of a
    /// blob present in the store.
    pub fn resolve(&self, s: &str) -> Result<Digest> {
        if let Ok(d) = s.parse::<Digest>() {
            if self.has_blob(&d) {
                return Ok(d);
            }
            return Err(self.not_found(format!("blob {d}")));
        }
        if s.starts_with("sha256:") {
            return Err(s.parse::<Digest>().expect_err("parse failed above"));
        }
        let r: RefName = s.parse()?;
        let entry = self
            .read_ref(&r)?
            .ok_or_else(|| self.not_found(format!("reference {r}")))?;
        if !self.has_blob(&entry.digest) {
            return Err(self.not_found(format!("blob {} (named by {r})", entry.digest)));
        }
        Ok(entry.digest)
    }

    /// The validated manifest of a blob in the store; marks the blob used.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let path = self.manifest_path(d);
        if !path.exists() {
            return Err(self.not_found(format!("manifest of {d}")));
        }
        let m = Manifest::open(&path, Some(d))?;
        self.mark_used(d);
        Ok(m)
    }

    /// Maps a blob read-only, with its manifest; marks it used.
    pub fn open_blob(&self, d: &Digest) -> Result<Blob> {
        let manifest = self.manifest(d)?;
        let path = self.blob_path(d);
        let file = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => self.not_found(format!("blob {d}")),
            _ => StoreError::Io {
                op: "open blob",
                path: path.clone(),
                error: e,
            },
        })?;
        // SAFETY: blobs are read-only files that the store only ever creates
        // by rename and removes by unlink; neither disturbs an existing map.
        // Truncation in place by an outside process would (SIGBUS); the store
        // directory belongs to the store.
        let map = unsafe { Mmap::map(&file) }.ctx("map blob", &path)?;
        Ok(Blob { map, manifest, path })
    }

    /// Records that a blob was used now (its mtime), for LRU eviction. Best
    /// effort: a store on a read-only mount still serves reads.
    pub fn mark_used(&self, d: &Digest) {
        if let Ok(f) = File::open(self.blob_path(d)) {
            let _ = f.set_modified(SystemTime::now());
        }
    }

    /// Adds a file to the store and returns its digest. Writing and hashing
    /// run at once over the one map of the source: one thread writes it to a
    /// private temporary file (O_DIRECT where the file system allows, so the
    /// copy costs no CPU and no page cache), one hashes the whole stream, the
    /// others hash the chunks. The source's size and mtime are checked after,
    /// so a file changed meanwhile is refused rather than stored under a
    /// digest of bytes that were not written.
    pub fn put(&self, src: &SourceFile, opts: &PutOptions, progress: &(dyn Fn(u64) + Sync)) -> Result<PutOutcome> {
        check_chunk_bytes(opts.chunk_bytes)?;
        let leaf_bytes = opts
            .leaf_bytes
            .unwrap_or_else(|| leaves::default_leaf_bytes(opts.chunk_bytes));
        leaves::check_leaf_bytes(leaf_bytes, opts.chunk_bytes)?;
        let data: &[u8] = &src.map;
        let size_bytes = data.len() as u64;
        let _lock = self.lock(LockKind::Shared)?;
        let tmp = self.temp_file("put")?;

        let chunk_bytes = opts.chunk_bytes;
        let chunk_threads = opts.threads.saturating_sub(1).max(1);
        let (write_result, digest, leaf_sums) = std::thread::scope(|s| {
            let writer = s.spawn(|| write_blob(&tmp, data));
            // One pass of leaf digests on the cores that the sequential
            // whole-file digest leaves idle; the chunk digests are derived
            // from the leaves (format 3) when the manifest is built.
            let leaves = s.spawn(|| leaves::leaf_digests_parallel(data, leaf_bytes, chunk_threads));
            let digest = hash::sha256_stream(data, &mut |n| progress(n));
            let write_result = writer.join().expect("writer thread does not panic");
            (write_result, digest, leaves.join().expect("hash threads do not panic"))
        });
        write_result?;
        src.check_unchanged()?;

        let existed = self.has_blob(&digest);
        if !self.manifest_path(&digest).exists() || !existed {
            let name = match &opts.name {
                Some(r) => r.to_string(),
                None => src
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            };
            let info = if gguf::is_gguf(data) {
                gguf::parse(data).ok()
            } else {
                None
            };
            let rec = ManifestRecord::new(digest, size_bytes, &name, chunk_bytes, leaf_bytes, leaf_sums, info);
            self.write_atomic(&self.manifest_path(&digest), &rec.encode(), 0o444)?;
        }
        if !existed {
            tmp.file
                .set_permissions(fs::Permissions::from_mode(0o444))
                .ctx("chmod", &tmp.path)?;
            tmp.file.sync_all().ctx("fsync", &tmp.path)?;
            tmp.persist(&self.blob_path(&digest))?;
        }
        if let Some(name) = &opts.name {
            self.set_ref(name, &digest, opts.pin)?;
        }
        self.mark_used(&digest);
        Ok(PutOutcome {
            digest,
            size_bytes,
            existed,
        })
    }

    /// Checks a blob: size, every chunk on `threads` threads, and with `full`
    /// also the whole-file digest (one sequential pass).
    pub fn verify(
        &self,
        d: &Digest,
        threads: usize,
        full: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<VerifyReport> {
        let mut report = VerifyReport {
            digest: *d,
            size_bytes: 0,
            actual_bytes: 0,
            chunk_bytes: 0,
            bad_chunks: Vec::new(),
            full_ok: None,
            problems: Vec::new(),
        };
        let path = self.blob_path(d);
        report.actual_bytes = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.not_found(format!("blob {d}"))),
            Err(e) => return Err(e).ctx("stat blob", &path),
        };
        let blob = match self.open_blob(d) {
            Ok(b) => b,
            Err(e @ (StoreError::BadManifest { .. } | StoreError::NotFound { .. })) => {
                report.problems.push(format!("manifest unusable: {e}"));
                return Ok(report);
            }
            Err(e) => return Err(e),
        };
        let m = blob.manifest();
        report.size_bytes = m.size_bytes();
        report.chunk_bytes = m.chunk_bytes();
        if report.actual_bytes < report.size_bytes {
            report.problems.push(format!(
                "truncated: {} of {} bytes",
                report.actual_bytes, report.size_bytes
            ));
        } else if report.actual_bytes > report.size_bytes {
            report.problems.push(format!(
                "{} bytes longer than the {} the manifest records",
                report.actual_bytes - report.size_bytes,
                report.size_bytes
            ));
        }
        report.bad_chunks = blob.bad_chunks(threads, progress);
        if let Err(e) = m.check_tree() {
            // The bytes may be fine, but a GPU load checks the leaves, and
            // these leaves do not vouch for the chunks.
            report.problems.push(format!("leaf digests: {e}"));
        }
        for &i in &report.bad_chunks {
            let r = chunk_range(i, m.size_bytes(), m.chunk_bytes());
            let what = if r.end > report.actual_bytes {
                "missing or short"
            } else {
                "does not match its digest"
            };
            report
                .problems
                .push(format!("chunk {i} (bytes {}..{}) {what}", r.start, r.end));
        }
        if full {
            let got = hash::sha256_stream(blob.bytes(), &mut |_| {});
            report.full_ok = Some(got == *d);
            if got != *d {
                report.problems.push(format!("whole-file digest is {got}"));
            }
        }
        Ok(report)
    }

    /// Maps a blob and checks its size and every chunk first: the call for
    /// a consumer that must never load a corrupt model.
    pub fn open_verified(&self, d: &Digest, threads: usize, progress: &(dyn Fn(u64) + Sync)) -> Result<Blob> {
        let blob = self.open_blob(d)?;
        let size = blob.manifest().size_bytes();
        if blob.bytes().len() as u64 != size {
            return Err(StoreError::Corrupt {
                digest: *d,
                detail: format!("{} bytes on disk, manifest records {size}", blob.bytes().len()),
            });
        }
        let bad = blob.bad_chunks(threads, progress);
        if let Some(&first) = bad.first() {
            return Err(StoreError::Corrupt {
                digest: *d,
                detail: format!(
                    "chunk {first} does not match its digest ({} bad chunks); run `verify`",
                    bad.len()
                ),
            });
        }
        Ok(blob)
    }

    /// Copies a blob to `out` after verifying every chunk; `out` appears
    /// atomically (temporary file beside it, fsync, rename).
    pub fn get(&self, d: &Digest, out: &Path, threads: usize, progress: &(dyn Fn(u64) + Sync)) -> Result<u64> {
        let blob = self.open_verified(d, threads, progress)?;
        let size = blob.manifest().size_bytes();
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = out.file_name().ok_or_else(|| StoreError::BadInput {
            path: out.to_path_buf(),
            reason: "not a file path".into(),
        })?;
        let tmp_path = dir.join(format!(".{}.cnse-{}", file_name.to_string_lossy(), std::process::id()));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o644)
                .open(&tmp_path)
                .ctx("create", &tmp_path)?;
            f.write_all(blob.bytes()).ctx("write", &tmp_path)?;
            f.sync_all().ctx("fsync", &tmp_path)?;
            fs::rename(&tmp_path, out).ctx("rename into place", out)?;
            sys::fsync_dir(&dir).ctx("fsync directory of", out)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp_path);
        }
        result.map(|_| size)
    }
}
