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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::CudaStream;

use crate::pinned::DeviceBuffer;
use crate::sha256::{LeafHasher, LeafLaunch};
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
}

impl GpuVerifier {
    /// Compiles the SHA-256 kernel for the streamer's device.
    pub fn new(streamer: &Streamer) -> Result<Self, KernelError> {
        Ok(Self {
            hasher: LeafHasher::new(streamer.context())?,
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
            state: Mutex::new((0, Vec::new())),
            readahead,
        };
        let opts = LoadOptions { verify: false, ..opts };
        let (mut blob, mut report) = streamer.load_with(spec, opts, Some(&sink))?;
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
    /// Device buffer address and the workers' streams (set by `begin`);
    /// the lock also serialises launches on the hash stream.
    state: Mutex<(u64, Vec<Arc<CudaStream>>)>,
    readahead: Option<&'a crate::Readahead>,
}

impl ChunkSink for Windows<'_> {
    fn begin(&self, device_base: u64, streams: &[Arc<CudaStream>]) -> Result<(), KernelError> {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = (device_base, streams.to_vec());
        Ok(())
    }

    fn chunk_start(&self, _chunk: usize, end: u64) {
        if let Some(r) = self.readahead {
            r.wait_for(end);
        }
    }

    fn chunk_queued(&self, chunk: usize, _stream: &Arc<CudaStream>) -> Result<(), KernelError> {
        let w = chunk / self.window_chunks;
        let first_chunk = w * self.window_chunks;
        let in_window = (first_chunk + self.window_chunks).min(self.chunks) - first_chunk;
        if self.done[w].fetch_add(1, Ordering::AcqRel) + 1 != in_window {
            return Ok(());
        }
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (base, streams) = &*state;
        let hs = self.hasher.stream();
        for s in streams {
            hs.join(s).map_err(KernelError::driver("cuStreamWaitEvent"))?;
        }
        let per_chunk = self.chunk_bytes / self.leaf_bytes;
        let first = first_chunk as u64 * per_chunk;
        let end = ((first_chunk + in_window) as u64 * per_chunk).min(self.leaf_count);
        let launch = LeafLaunch {
            data: *base,
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
        unsafe { self.hasher.queue(&launch) }
    }

    fn finish(&self) -> Result<(), KernelError> {
        match self.hasher.outcome()? {
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
                })
            }
        }
    }
}
