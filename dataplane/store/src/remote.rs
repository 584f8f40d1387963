//! The HTTP filer remote: blobs, manifests and references kept on a server
//! that speaks the SeaweedFS Filer API subset (PUT, GET with Range, HEAD,
//! DELETE on paths). Layout under the filer URL:
//!
//! ```text
//! <url>/blobs/sha256/<hex>        the blob bytes
//! <url>/manifests/sha256/<hex>    the rkyv manifest (same bytes as locally)
//! <url>/refs/<name>/<tag>         "sha256:<hex>\n"
//! ```
//!
//! A push uploads the blob before its manifest and the manifest before the
//! reference, so whatever a reader can name is complete. A pull downloads
//! into `DIR/tmp/pull-<hex>.partial`, checks each chunk against the manifest
//! as it arrives, records finished chunks in `pull-<hex>.state`, resumes
//! from the first missing chunk, and fetches a bad chunk again on its own.
//! Everything is addressed by the whole-file SHA-256; the manifest on the
//! filer is whatever format the pushing store had (1, 2 or 3), and a pull
//! always stores format 3, derived from the downloaded bytes.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use memmap2::Mmap;

use crate::digest::Digest;
use crate::error::{IoContext, Result, StoreError};
use crate::hash::{self, chunk_range};
use crate::http::{self, Url};
use crate::manifest::{Manifest, MANIFEST_BYTES_MAX};
use crate::merkle::{ChunkHasher, ChunkScheme};
use crate::refname::RefName;
use crate::store::Store;
use crate::sys::{self, LockKind};

mod download;

use download::{Download, RateLimit};

/// Times a chunk that fails its digest is fetched again before the pull gives up.
pub const REFETCH_ATTEMPTS_MAX: u32 = 3;
/// Consecutive network failures (no byte received in between) a pull or a
/// push survives before it gives up.
pub const NETWORK_RETRIES_MAX: u32 = 3;
/// Wait before the n-th retry: n times this.
const RETRY_BACKOFF_MS: u64 = 500;
/// Socket reads are at most this big (also the granularity of rate limiting).
const READ_PIECE_BYTES: usize = 256 << 10;
const STATE_MAGIC: [u8; 8] = *b"CNSEPS01";
const STATE_HEADER_BYTES: u64 = 24;

/// A filer at a base URL.
#[derive(Debug, Clone)]
pub struct Filer {
    url: Url,
}

/// What a pull names: a digest or a reference on the filer.
#[derive(Debug, Clone)]
pub enum PullTarget {
    Digest(Digest),
    Ref(RefName),
}

impl std::str::FromStr for PullTarget {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<PullTarget> {
        match s.parse::<Digest>() {
            Ok(d) => Ok(PullTarget::Digest(d)),
            Err(e) if s.starts_with("sha256:") => Err(e),
            Err(_) => Ok(PullTarget::Ref(s.parse()?)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Bytes per second; `None` for as fast as the network goes.
    pub limit_rate_bytes: Option<u64>,
    /// Pin the local reference that a pull by name creates.
    pub pin: bool,
    /// Also name the pulled blob locally (defaults to the pulled name).
    pub name: Option<RefName>,
}

#[derive(Debug, Clone, Default)]
pub struct PushOutcome {
    pub digest: Option<Digest>,
    pub size_bytes: u64,
    pub uploaded_bytes: u64,
    /// The filer already had the blob.
    pub blob_existed: bool,
}

#[derive(Debug, Clone)]
pub struct PullOutcome {
    pub digest: Digest,
    pub size_bytes: u64,
    /// Body bytes received in this run (re-fetches included).
    pub downloaded_bytes: u64,
    /// Bytes already verified by an earlier, interrupted run.
    pub resumed_bytes: u64,
    /// Chunks that failed their digest and were fetched again alone.
    pub refetched_chunks: Vec<u64>,
    /// The blob was already in the local store.
    pub existed: bool,
}

fn blob_rel(d: &Digest) -> String {
    format!("/blobs/sha256/{}", d.hex())
}
fn manifest_rel(d: &Digest) -> String {
    format!("/manifests/sha256/{}", d.hex())
}
fn ref_rel(r: &RefName) -> String {
    format!("/refs/{}/{}", r.name(), r.tag())
}

impl Filer {
    pub fn new(url: &str) -> Result<Filer> {
        Ok(Filer { url: Url::parse(url)? })
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    fn status_error(&self, method: &'static str, rel: &str, status: u16) -> StoreError {
        StoreError::HttpStatus {
            method,
            url: self.url.display(rel),
            status,
        }
    }

    fn io_error(&self, method: &'static str, rel: &str, e: io::Error) -> StoreError {
        StoreError::Http {
            method,
            url: self.url.display(rel),
            reason: e.to_string(),
        }
    }

    /// `HEAD`: the size of a file on the filer, or `None` when absent.
    pub fn head(&self, rel: &str) -> Result<Option<u64>> {
        let r = http::request(&self.url, "HEAD", rel, &[], None)?;
        match r.status {
            200 => Ok(r.content_length()),
            404 => Ok(None),
            s => Err(self.status_error("HEAD", rel, s)),
        }
    }

    /// `PUT` of a whole file.
    pub fn put(&self, rel: &str, body: &[u8]) -> Result<()> {
        let mut r = http::request(
            &self.url,
            "PUT",
            rel,
            &[("Content-Type", "application/octet-stream")],
            Some(body),
        )?;
        let _ = r.read_body(1 << 20);
        match r.status {
            200..=299 => Ok(()),
            s => Err(self.status_error("PUT", rel, s)),
        }
    }

    /// `GET` of a small whole file, or `None` when absent.
    pub fn get_small(&self, rel: &str, max_bytes: u64) -> Result<Option<Vec<u8>>> {
        let mut r = http::request(&self.url, "GET", rel, &[], None)?;
        match r.status {
            200 => Ok(Some(r.read_body(max_bytes).map_err(|e| self.io_error("GET", rel, e))?)),
            404 => Ok(None),
            s => Err(self.status_error("GET", rel, s)),
        }
    }

    /// `DELETE` of a file; absent files are not an error.
    pub fn delete(&self, rel: &str) -> Result<()> {
        let mut r = http::request(&self.url, "DELETE", rel, &[], None)?;
        let _ = r.read_body(1 << 20);
        match r.status {
            200..=299 | 404 => Ok(()),
            s => Err(self.status_error("DELETE", rel, s)),
        }
    }

    /// Resolves a reference on the filer.
    pub fn resolve_ref(&self, r: &RefName) -> Result<Digest> {
        let rel = ref_rel(r);
        let text = self.get_small(&rel, 256)?.ok_or_else(|| StoreError::RemoteNotFound {
            what: format!("reference {r}"),
            url: self.url.display(""),
        })?;
        let text = String::from_utf8_lossy(&text);
        text.lines().next().unwrap_or("").parse().map_err(|_| StoreError::Http {
            method: "GET",
            url: self.url.display(&rel),
            reason: "reference does not hold a digest".into(),
        })
    }

    /// Uploads a local blob (after verifying it), its manifest, and the
    /// reference `name` when given. A blob the filer already holds at the
    /// right size is not uploaded again.
    pub fn push(
        &self,
        store: &Store,
        d: &Digest,
        name: Option<&RefName>,
        threads: usize,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PushOutcome> {
        let blob = store.open_blob(d)?;
        let m = blob.manifest();
        let bad = blob.bad_chunks(threads, &|_| {});
        if blob.bytes().len() as u64 != m.size_bytes() || !bad.is_empty() {
            return Err(StoreError::Corrupt {
                digest: *d,
                detail: "the local copy fails verification; refusing to push it (run `verify`)".into(),
            });
        }
        let mut out = PushOutcome {
            digest: Some(*d),
            size_bytes: m.size_bytes(),
            ..PushOutcome::default()
        };
        let rel = blob_rel(d);
        if self.head(&rel)? == Some(m.size_bytes()) {
            out.blob_existed = true;
        } else {
            let mut failures = 0;
            loop {
                match self.put(&rel, blob.bytes()) {
                    Ok(()) => break,
                    Err(StoreError::Http { .. }) if failures < NETWORK_RETRIES_MAX => {
                        failures += 1;
                        std::thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS * failures as u64));
                    }
                    Err(e) => return Err(e),
                }
            }
            out.uploaded_bytes += m.size_bytes();
        }
        progress(m.size_bytes());
        self.put(&manifest_rel(d), m.file_bytes())?;
        out.uploaded_bytes += m.file_bytes().len() as u64;
        if let Some(r) = name {
            self.put(&ref_rel(r), format!("{d}\n").as_bytes())?;
        }
        Ok(out)
    }

    /// Fetches the manifest of `d` from the filer and validates it.
    pub fn manifest(&self, d: &Digest) -> Result<Manifest> {
        let rel = manifest_rel(d);
        let bytes = self
            .get_small(&rel, MANIFEST_BYTES_MAX)?
            .ok_or_else(|| StoreError::RemoteNotFound {
                what: format!("manifest of {d}"),
                url: self.url.display(""),
            })?;
        Manifest::from_bytes(&bytes, Path::new(&self.url.display(&rel)), Some(d))
    }

    /// Downloads a blob into the local store, verifying chunk by chunk and
    /// resuming an earlier interrupted pull of the same digest.
    pub fn pull(
        &self,
        store: &Store,
        target: &PullTarget,
        opts: &PullOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<PullOutcome> {
        let (digest, pulled_name) = match target {
            PullTarget::Digest(d) => (*d, None),
            PullTarget::Ref(r) => (self.resolve_ref(r)?, Some(r.clone())),
        };
        let local_name = opts.name.clone().or(pulled_name);
        let finish_ref = |outcome: PullOutcome| -> Result<PullOutcome> {
            if let Some(r) = &local_name {
                store.set_ref(r, &digest, opts.pin)?;
            }
            store.mark_used(&digest);
            Ok(outcome)
        };
        if store.has_blob(&digest) && store.manifest(&digest).is_ok() {
            let size_bytes = fs::metadata(store.blob_path(&digest)).map(|m| m.len()).unwrap_or(0);
            return finish_ref(PullOutcome {
                digest,
                size_bytes,
                downloaded_bytes: 0,
                resumed_bytes: 0,
                refetched_chunks: Vec::new(),
                existed: true,
            });
        }
        let manifest = self.manifest(&digest)?;
        let mut dl = Download::open(store, &manifest)?;
        let mut outcome = PullOutcome {
            digest,
            size_bytes: manifest.size_bytes(),
            downloaded_bytes: 0,
            resumed_bytes: dl.done_bytes(&manifest),
            refetched_chunks: Vec::new(),
            existed: false,
        };
        progress(outcome.resumed_bytes);
        let mut limiter = RateLimit::new(opts.limit_rate_bytes);
        let mut buf = vec![0u8; READ_PIECE_BYTES];

        // One ranged GET per run of missing chunks. A chunk that fails its
        // digest stays missing, so the next pass fetches it again, alone
        // unless its neighbour failed too. A dropped connection is retried
        // from the first chunk not yet down.
        let mut fetches_bad = vec![0u32; manifest.chunk_count() as usize];
        let mut network_failures = 0u32;
        loop {
            let runs = dl.missing_runs();
            if runs.is_empty() {
                break;
            }
            for (first, last) in runs {
                for i in first..=last {
                    if fetches_bad[i as usize] > 0 {
                        outcome.refetched_chunks.push(i);
                    }
                }
                let mut bad = Vec::new();
                let done_before = outcome.downloaded_bytes;
                let result = self.fetch_run(
                    &manifest,
                    &mut dl,
                    first,
                    last,
                    &mut buf,
                    &mut limiter,
                    &mut outcome,
                    &mut bad,
                    progress,
                );
                for &i in &bad {
                    fetches_bad[i as usize] += 1;
                    if fetches_bad[i as usize] > REFETCH_ATTEMPTS_MAX {
                        let r = chunk_range(i, manifest.size_bytes(), manifest.chunk_bytes());
                        return Err(StoreError::RemoteCorrupt {
                            digest,
                            detail: format!(
                                "chunk {i} (bytes {}..{}) fails its digest after {} fetches; the verified chunks \
                                 are kept for a later pull",
                                r.start, r.end, fetches_bad[i as usize]
                            ),
                        });
                    }
                }
                match result {
                    Ok(()) => network_failures = 0,
                    Err(e @ StoreError::Http { .. }) => {
                        if outcome.downloaded_bytes > done_before {
                            network_failures = 0;
                        }
                        network_failures += 1;
                        if network_failures > NETWORK_RETRIES_MAX {
                            return Err(e);
                        }
                        std::thread::sleep(Duration::from_millis(RETRY_BACKOFF_MS * network_failures as u64));
                        // Recompute the runs: part of this one may be down.
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        dl.commit(store, &manifest)?;
        finish_ref(outcome)
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch_run(
        &self,
        m: &Manifest,
        dl: &mut Download,
        first: u64,
        last: u64,
        buf: &mut [u8],
        limiter: &mut RateLimit,
        outcome: &mut PullOutcome,
        bad: &mut Vec<u64>,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<()> {
        let (size, chunk) = (m.size_bytes(), m.chunk_bytes());
        let start = chunk_range(first, size, chunk).start;
        let end = chunk_range(last, size, chunk).end;
        let rel = blob_rel(&m.digest());
        let range = format!("bytes={}-{}", start, end - 1);
        let mut r = http::request(&self.url, "GET", &rel, &[("Range", &range)], None)?;
        match r.status {
            206 => {
                let want = format!("bytes {}-{}/", start, end - 1);
                if !r.header("content-range").is_some_and(|v| v.trim().starts_with(&want)) {
                    return Err(StoreError::Http {
                        method: "GET",
                        url: self.url.display(&rel),
                        reason: format!(
                            "Content-Range {:?} does not answer Range {range}",
                            r.header("content-range")
                        ),
                    });
                }
            }
            // A server may answer a range covering the whole file with 200.
            200 if start == 0 && end == size => {}
            404 => {
                return Err(StoreError::RemoteNotFound {
                    what: format!("blob {}", m.digest()),
                    url: self.url.display(""),
                })
            }
            s => return Err(self.status_error("GET", &rel, s)),
        }
        // Each piece is hashed and written to the partial file as it
        // arrives, so memory stays at one piece whatever the chunk size; a
        // chunk counts as done only once its digest matched and its bytes
        // are durable.
        for i in first..=last {
            let cr = chunk_range(i, size, chunk);
            let len = (cr.end - cr.start) as usize;
            // By the manifest's definition: plain SHA-256 (formats 1, 2)
            // or the Merkle root over the chunk's leaves (format 3).
            let mut ctx = ChunkHasher::new(m.chunk_scheme());
            let mut got = 0;
            while got < len {
                let want = (len - got).min(buf.len());
                let n = r.read(&mut buf[..want]).map_err(|e| self.io_error("GET", &rel, e))?;
                if n == 0 {
                    return Err(self.io_error("GET", &rel, io::ErrorKind::UnexpectedEof.into()));
                }
                ctx.update(&buf[..n]);
                dl.write_piece(cr.start + got as u64, &buf[..n])?;
                got += n;
                outcome.downloaded_bytes += n as u64;
                limiter.account(n as u64);
            }
            if ctx.finish() == m.chunk_digests()[i as usize] {
                dl.mark_done(i)?;
                progress(len as u64);
            } else {
                bad.push(i);
            }
        }
        Ok(())
    }
}
