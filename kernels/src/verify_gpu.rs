//! GPU-verified loads: the streamer moves the blob without hashing on the
//! host, and the GPU hashes the manifest's leaves (`sha256.rs`) as soon as
//! a window of chunks has landed, comparing them with the manifest on the
//! device. Copies of later windows overlap the hashing of earlier ones.
//!
//! Ordering: when the last chunk of a window has all its copies queued
//! (each worker queues a chunk's pieces on its own stream, in order), the
//! hash stream waits on an event recorded on every worker stream at that
//! moment, so the window's kernel starts only after every copy into it has
//! landed. The device buffer is exposed only when every leaf matched; the
//! hash stream is drained before the buffer can be freed.
//!
//! Binding: the blob's chunk digests (manifest format 3) are Merkle roots
//! over the leaf digests (`cnse_store::merkle`). While the copies run, one
//! host thread recomputes every root from the manifest's leaves and
//! compares it with the chunk digest, so leaves that match on the GPU vouch
//! for the chunk digests, and through them for the blob the store checked.
//!
//! Early abort: behind each launch, the kernel's mismatch words are copied
//! into a pinned report slot and an event is recorded; workers read the
//! slots of completed launches before each chunk, and the first mismatch
//! (or unbound leaves) stops them: no further copies are queued, the copies
//! in flight and the launches queued finish, the device buffer is freed,
//! and the error names the first bad chunk and leaf among the windows
//! hashed, and how many bytes had been copied.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cnse_store::ChunkScheme;
use cudarc::driver::{CudaEvent, CudaStream};

use crate::pinned::{DeviceBuffer, PinnedBuffer};
use crate::sha256::{LeafHasher, LeafLaunch, LeafMismatch};
use crate::stream::{BlobSpec, ChunkSink, DeviceBlob, LoadOptions, LoadReport, Streamer};
use crate::KernelError;

/// The manifest's leaf digests of one blob.
#[derive(Clone, Copy, Debug)]
pub struct LeafSpec<'a> {
    pub leaf_bytes: u64,
    /// One SHA-256 per leaf; the last leaf may be short.
    pub digests: &'a [[u8; 32]],
}

/// Knobs of GPU verification, chosen by `cnse-dp gpu bench --sha`.
#[derive(Clone, Copy, Debug)]
pub struct GpuVerifyOptions {
    /// Bytes per hash launch (whole chunks, at least one): larger windows
    /// give the kernel more leaves (threads) at once, smaller ones leave
    /// less hashing after the last copy.
    pub window_bytes: u64,
}

impl Default for GpuVerifyOptions {
    fn default() -> Self {
        Self {
            window_bytes: 512 << 20,
        }
    }
}

/// A compiled leaf hasher, reused across loads like the streamer.
pub struct GpuVerifier {
    hasher: LeafHasher,
    /// Report slots of the launches of one load (`REPORTS_KEPT` windows;
    /// a load with more windows pins a larger set for itself).
    reports: PinnedBuffer,
}

impl GpuVerifier {
    /// Compiles the SHA-256 kernel for the streamer's device.
    pub fn new(streamer: &Streamer) -> Result<Self, KernelError> {
        Ok(Self {
            hasher: LeafHasher::new(streamer.context())?,
            reports: PinnedBuffer::new(streamer.context(), REPORTS_KEPT * REPORT_BYTES, false)?,
        })
    }

    pub fn hasher(&self) -> &LeafHasher {
        &self.hasher
    }

    /// Loads `spec`'s blob with `streamer` (no host hashing: `opts.verify`
    /// is ignored) and checks every leaf on the GPU. A mismatch frees the
    /// device buffer and names the first bad leaf and its chunk.
    pub fn load(
        &self,
        streamer: &mut Streamer,
        spec: &BlobSpec,
        leaves: &LeafSpec,
        opts: LoadOptions,
        gv: GpuVerifyOptions,
    ) -> Result<(DeviceBlob, LoadReport), KernelError> {
        self.load_after(streamer, spec, leaves, opts, gv, None)
    }

    /// `load`, with workers held back behind `readahead` when given (see
    /// `Streamer::load_after`).
    pub fn load_after(
        &self,
        streamer: &mut Streamer,
        spec: &BlobSpec,
        leaves: &LeafSpec,
        opts: LoadOptions,
        gv: GpuVerifyOptions,
        readahead: Option<&crate::Readahead>,
    ) -> Result<(DeviceBlob, LoadReport), KernelError> {
        let t0 = Instant::now();
        check(spec, leaves)?;
        self.hasher.reset()?;
        let chunks = spec.chunk_digests.len();
        let window_chunks = (gv.window_bytes / spec.chunk_bytes).max(1) as usize;
        let windows = chunks.div_ceil(window_chunks);
        let mut expect = DeviceBuffer::new(streamer.context(), leaves.digests.len() * 32)?;
        expect.copy_from_host(0, leaves.digests.as_flattened())?;
        let more_reports;
        let reports = if windows * REPORT_BYTES <= self.reports.len() {
            &self.reports
        } else {
            more_reports = PinnedBuffer::new(streamer.context(), windows * REPORT_BYTES, false)?;
            &more_reports
        };
        let sink = Windows {
            hasher: &self.hasher,
            path: spec.path,
            size: spec.size_bytes,
            chunk_bytes: spec.chunk_bytes,
            leaf_bytes: leaves.leaf_bytes,
            leaf_count: leaves.digests.len() as u64,
            chunks,
            window_chunks,
            done: (0..windows).map(|_| AtomicUsize::new(0)).collect(),
            expect,
            reports,
            launches: Mutex::new(Launches::default()),
            failed: AtomicBool::new(false),
            unbound: AtomicU64::new(NONE),
            readahead,
        };
        let opts = LoadOptions { verify: false, ..opts };
        let per_chunk = spec.chunk_bytes / leaves.leaf_bytes;
        // The leaves are checked against the chunk digests (the Merkle
        // roots) on one more thread while the copies run, so a leaf that
        // matches on the GPU vouches for its chunk digest, hence for the
        // whole-file digest the store checked at put.
        let (loaded, unbound) = std::thread::scope(|s| {
            let bind = s.spawn(|| {
                let c = cnse_store::merkle::first_unbound_chunk(spec.chunk_digests, leaves.digests, per_chunk);
                if let Some(c) = c {
                    sink.unbound.store(c, Ordering::Release);
                }
                c
            });
            let loaded = streamer.load_with(spec, opts, Some(&sink));
            (loaded, bind.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
        });
        if let Some(chunk) = unbound {
            // `loaded`, and with it any device buffer, is dropped here.
            return Err(KernelError::Unbound {
                path: spec.path.to_path_buf(),
                chunk,
            });
        }
        let (mut blob, mut report) = loaded?;
        blob.verified = true;
        report.verified = true;
        report.total_s = t0.elapsed().as_secs_f64();
        Ok((blob, report))
    }
}

fn check(spec: &BlobSpec, leaves: &LeafSpec) -> Result<(), KernelError> {
    let bad = |detail: String| {
        Err(KernelError::Spec {
            path: spec.path.to_path_buf(),
            detail,
        })
    };
    let l = leaves.leaf_bytes;
    match spec.scheme {
        ChunkScheme::Merkle { leaf_bytes } if leaf_bytes == l => {}
        ChunkScheme::Merkle { leaf_bytes } => {
            return bad(format!(
                "the chunk digests are Merkle roots over leaves of {leaf_bytes} bytes, not of {l}"
            ))
        }
        ChunkScheme::Plain => {
            return bad(
                "the chunk digests are plain SHA-256 (manifest format 1 or 2), so leaf digests do not vouch for \
                 them; `cnse-dp store upgrade` rewrites the manifest in format 3"
                    .into(),
            )
        }
    }
    if l == 0 || l % 64 != 0 || l > u32::MAX as u64 || spec.chunk_bytes % l != 0 {
        return bad(format!(
            "leaf size {l} must be a multiple of 64 below 4 GiB that divides the chunk size {}",
            spec.chunk_bytes
        ));
    }
    let want = spec.size_bytes.div_ceil(l);
    if leaves.digests.len() as u64 != want {
        return bad(format!(
            "{want} leaves need {want} leaf digests, manifest has {}",
            leaves.digests.len()
        ));
    }
    Ok(())
}

/// Bytes of one launch's mismatch report (`LeafHasher::queue_report`).
const REPORT_BYTES: usize = 16;
/// Report slots a verifier keeps pinned (4096 windows: 2 TiB at 512 MiB).
const REPORTS_KEPT: usize = 4096;
/// `Windows::unbound` when every chunk digest is its leaves' root.
const NONE: u64 = u64::MAX;

/// Launches queued on the hash stream whose reports were not read yet.
#[derive(Default)]
struct Launches {
    /// Device buffer address and the workers' streams (set by `begin`).
    base: u64,
    streams: Vec<Arc<CudaStream>>,
    /// (window, event recorded after its report copy), in launch order.
    pending: VecDeque<(usize, CudaEvent)>,
}

struct Windows<'a> {
    hasher: &'a LeafHasher,
    path: &'a std::path::Path,
    size: u64,
    chunk_bytes: u64,
    leaf_bytes: u64,
    leaf_count: u64,
    chunks: usize,
    window_chunks: usize,
    /// Chunks of each window whose copies are all queued.
    done: Vec<AtomicUsize>,
    /// The expected leaf digests, on the device.
    expect: DeviceBuffer,
    /// One report slot per window, written by the device after its launch.
    reports: &'a PinnedBuffer,
    /// The lock also serialises launches on the hash stream.
    launches: Mutex<Launches>,
    /// A report showed a mismatch: no more copies are queued.
    failed: AtomicBool,
    /// First chunk whose digest is not the root of its leaves, or `NONE`.
    unbound: AtomicU64,
    readahead: Option<&'a crate::Readahead>,
}

impl Windows<'_> {
    /// Reads the reports of the launches that have completed, in order;
    /// an error once any showed a mismatch (or the leaves were found not
    /// to be bound to the chunk digests), which stops the load.
    fn poll(&self) -> Result<(), KernelError> {
        let stop = || KernelError::Aborted {
            path: self.path.to_path_buf(),
            detail: "stopped by a failed check".into(),
        };
        if self.failed.load(Ordering::Acquire) || self.unbound.load(Ordering::Acquire) != NONE {
            return Err(stop());
        }
        let mut l = self.launches.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((w, ev)) = l.pending.front() {
            if !ev.try_is_complete().map_err(KernelError::driver("cuEventQuery"))? {
                break;
            }
            // SAFETY: slot `w` lies inside `reports` (one per window); the
            // copy into it completed before its event did, and no other
            // copy targets it; a volatile read because the device wrote it.
            let words =
                unsafe { std::ptr::read_volatile(self.reports.as_ptr().add(w * REPORT_BYTES) as *const [u8; 16]) };
            l.pending.pop_front();
            if LeafMismatch::from_words(&words).is_some() {
                self.failed.store(true, Ordering::Release);
                return Err(stop());
            }
        }
        Ok(())
    }
}

impl ChunkSink for Windows<'_> {
    fn begin(&self, device_base: u64, streams: &[Arc<CudaStream>]) -> Result<(), KernelError> {
        let mut l = self.launches.lock().unwrap_or_else(|p| p.into_inner());
        (l.base, l.streams) = (device_base, streams.to_vec());
        Ok(())
    }

    fn chunk_start(&self, _chunk: usize, end: u64) -> Result<(), KernelError> {
        if let Some(r) = self.readahead {
            r.wait_for(end);
        }
        self.poll()
    }

    fn chunk_queued(&self, chunk: usize, _stream: &Arc<CudaStream>) -> Result<(), KernelError> {
        let w = chunk / self.window_chunks;
        let first_chunk = w * self.window_chunks;
        let in_window = (first_chunk + self.window_chunks).min(self.chunks) - first_chunk;
        if self.done[w].fetch_add(1, Ordering::AcqRel) + 1 != in_window {
            return Ok(());
        }
        let mut l = self.launches.lock().unwrap_or_else(|p| p.into_inner());
        let hs = self.hasher.stream();
        for s in &l.streams {
            hs.join(s).map_err(KernelError::driver("cuStreamWaitEvent"))?;
        }
        let per_chunk = self.chunk_bytes / self.leaf_bytes;
        let first = first_chunk as u64 * per_chunk;
        let end = ((first_chunk + in_window) as u64 * per_chunk).min(self.leaf_count);
        let launch = LeafLaunch {
            data: l.base,
            size: self.size,
            leaf_bytes: self.leaf_bytes as u32,
            first,
            count: end - first,
            expect: self.expect.device_ptr() + 32 * first,
            out: 0,
        };
        // SAFETY: the device buffer (`base`, `size` bytes) outlives the
        // launch: `load_with` calls `finish`, which synchronises the hash
        // stream, before it drops or returns the buffer; every copy into
        // this window is ordered before the launch by the joins above, and
        // nothing writes the window afterwards. `expect` holds 32 bytes per
        // leaf and lives in `self`, which outlives `finish`.
        unsafe { self.hasher.queue(&launch) }?;
        // SAFETY: slot `w` (16 bytes inside `reports`, pinned) is written
        // by this copy only, and read only after the event recorded behind
        // it; `finish` drains the hash stream before `reports` can go.
        unsafe { self.hasher.queue_report(self.reports.as_ptr().add(w * REPORT_BYTES)) }?;
        let ev = hs.record_event(None).map_err(KernelError::driver("cuEventRecord"))?;
        l.pending.push_back((w, ev));
        drop(l);
        self.poll()
    }

    fn finish(&self, copied_bytes: u64) -> Result<(), KernelError> {
        let outcome = self.hasher.outcome();
        self.launches.lock().unwrap_or_else(|p| p.into_inner()).pending.clear();
        match outcome? {
            None => Ok(()),
            Some(m) => {
                let offset = m.first_leaf * self.leaf_bytes;
                let chunk = offset / self.chunk_bytes;
                Err(KernelError::LeafMismatch {
                    path: self.path.to_path_buf(),
                    chunk,
                    leaf: m.first_leaf - chunk * (self.chunk_bytes / self.leaf_bytes),
                    offset,
                    end: (offset + self.leaf_bytes).min(self.size),
                    bad_leaves: m.bad_leaves,
                    copied_bytes,
                    size_bytes: self.size,
                })
            }
        }
    }
}
