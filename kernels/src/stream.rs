//! Verified streaming of a blob into GPU memory.
//!
//! The blob is cut into the manifest's chunks. Each worker thread takes whole
//! chunks from a shared counter (so a chunk is hashed sequentially, as
//! SHA-256 requires) and moves each chunk through its own pinned staging
//! slots: read a sub-block from the page cache, hash it while it is hot in
//! the core's cache, copy it into the slot, and when the slot is full hand it
//! to the copy engine with an asynchronous copy on the worker's stream. A slot
//! is refilled only after the event recorded behind its copy has fired, so
//! every worker keeps `slots_per_thread` (>= 2) copies in flight while it
//! hashes the next piece: hashing, host copies and DMA overlap.
//!
//! Bytes reach device memory before their chunk's digest is known; they are
//! exposed only after every chunk matched. A mismatch stops all workers, the
//! device buffer is freed, and the error names the chunk and its byte range.
//!
//! What is verified: every chunk against the manifest's chunk digests (by
//! the manifest's definition: plain SHA-256, or the Merkle root over the
//! chunk's leaves for format 3), and the size. The manifest's whole-file digest (what `sha256sum` prints) is
//! computed by the store at `put` together with the chunk digests; checking
//! the chunks checks the bytes it names without a sequential whole-file pass.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaStream};

use crate::pinned::{DeviceBuffer, PinnedBuffer};
pub use crate::spec::{hash_chunks, hash_file, OwnedSpec};
use crate::KernelError;
pub(crate) use worker::page_bytes;

mod config;
mod resident;
mod resident_load;
mod worker;

pub use config::*;
pub use resident::{Prefault, ResidentOptions, ResidentStats, REGISTER_PIECE_MIN, RESIDENT_ENTRIES_MAX};

/// Upper bound of worker threads (and of streams and slot sets).
pub const THREADS_MAX: usize = 64;
/// Upper bound of one pinned slot.
pub const SLOT_BYTES_MAX: usize = 256 << 20;
/// Upper bound of the whole staging pool.
pub const POOL_BYTES_MAX: usize = 4 << 30;
/// Default `copy_granule_bytes`, and the hash-then-copy granule.
pub const COPY_GRANULE_DEFAULT: usize = SUB_BYTES;
/// Threads per block of the copy kernel.
const COPY_THREADS: u32 = 256;
/// Largest range registered at once in register mode.
const REGISTER_PIECE_MAX: u64 = 64 << 20;
/// Hash-then-copy granule: small enough to stay in a core's L2 between the
/// hash and the copy.
const SUB_BYTES: usize = 256 << 10;

/// `path` opened for reading, and its length; `open_op` and `stat_op` name
/// the two steps in errors.
pub(crate) fn open_with_len(
    path: &Path,
    open_op: &'static str,
    stat_op: &'static str,
) -> Result<(File, u64), KernelError> {
    let io = |op: &'static str| {
        move |source| KernelError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    };
    let file = File::open(path).map_err(io(open_op))?;
    let len = file.metadata().map_err(io(stat_op))?.len();
    Ok((file, len))
}

/// The file of `spec`, open, with its length checked against the manifest.
fn open_blob(spec: &BlobSpec) -> Result<(File, u64), KernelError> {
    let (file, len) = open_with_len(spec.path, "open", "stat")?;
    if len != spec.size_bytes {
        return Err(KernelError::Spec {
            path: spec.path.to_path_buf(),
            detail: format!("file has {len} bytes, manifest says {}", spec.size_bytes),
        });
    }
    Ok((file, len))
}

struct Slot {
    buf: PinnedBuffer,
    copied: CudaEvent,
    in_flight: bool,
    /// The device's address of `buf` (copy-kernel mover).
    device_src: u64,
}

struct Worker {
    stream: Arc<CudaStream>,
    copy_fn: Option<CudaFunction>,
    slots: Vec<Slot>,
    next_slot: usize,
    /// Start addresses of the mapped pieces this worker registered in this
    /// load (Register mode). They stay registered until `drain`: an
    /// unregistration waits for the device, so unregistering behind each
    /// copy would stall every copy queued after it. At most one entry per
    /// chunk of the blob.
    registered: Vec<usize>,
}

/// Owns the pinned staging pool and one stream per worker; reused across
/// loads so that no load pays for pinning memory.
pub struct Streamer {
    ctx: Arc<CudaContext>,
    config: StreamerConfig,
    workers: Vec<Worker>,
    pool_alloc_s: f64,
    /// Blobs kept registered across loads (`SourceMode::Resident`).
    resident: resident::ResidentCache,
}

impl Streamer {
    /// Allocates the pinned pool (`threads × slots_per_thread × slot_bytes`)
    /// and the streams on device `ordinal`.
    pub fn new(ordinal: usize, mut config: StreamerConfig) -> Result<Self, KernelError> {
        config.check()?;
        if config.mover == Mover::Kernel && !crate::device::nvrtc_available() {
            // The copy kernel needs NVRTC; the copy engines need nothing.
            config.mover = Mover::CopyEngine;
        }
        let ctx = crate::device::open(ordinal)?;
        let t0 = Instant::now();
        let mut workers = Vec::with_capacity(config.threads);
        let copy_fn = match config.mover {
            Mover::CopyEngine | Mover::Sync => None,
            Mover::Kernel => {
                let ptx = crate::device::compile("copy.cu", COPY_CU, crate::device::arch_of(&ctx)?)?;
                let module = ctx.load_module(ptx).map_err(KernelError::driver("cuModuleLoadData"))?;
                Some(
                    module
                        .load_function("copy_from_host")
                        .map_err(KernelError::driver("cuModuleGetFunction"))?,
                )
            }
        };
        let mut streams = Vec::new();
        for _ in 0..config.streams.min(config.threads) {
            streams.push(ctx.new_stream().map_err(KernelError::driver("cuStreamCreate"))?);
        }
        for w in 0..config.threads {
            let stream = streams[w % streams.len()].clone();
            let mut slots = Vec::with_capacity(config.slots_per_thread);
            for _ in 0..config.slots_per_thread {
                let buf = PinnedBuffer::new(&ctx, config.slot_bytes, config.write_combined)?;
                let device_src = buf.device_ptr()?;
                slots.push(Slot {
                    buf,
                    copied: ctx.new_event(None).map_err(KernelError::driver("cuEventCreate"))?,
                    in_flight: false,
                    device_src,
                });
            }
            workers.push(Worker {
                stream,
                copy_fn: copy_fn.clone(),
                slots,
                next_slot: 0,
                registered: Vec::new(),
            });
        }
        Ok(Self {
            resident: resident::ResidentCache::new(ctx.clone()),
            ctx,
            config,
            workers,
            pool_alloc_s: t0.elapsed().as_secs_f64(),
        })
    }

    /// The distinct streams the workers queue their copies on.
    fn worker_streams(&self) -> Vec<Arc<CudaStream>> {
        let mut out: Vec<Arc<CudaStream>> = Vec::new();
        for w in &self.workers {
            if !out.iter().any(|s| Arc::ptr_eq(s, &w.stream)) {
                out.push(w.stream.clone());
            }
        }
        out
    }

    pub fn config(&self) -> StreamerConfig {
        self.config
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Whether the device can DMA from read-only registered host memory
    /// (what `SourceMode::Register` needs).
    pub fn supports_register(&self) -> bool {
        use cudarc::driver::sys::CUdevice_attribute as A;
        self.ctx
            .attribute(A::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED)
            .unwrap_or(0)
            == 1
    }

    /// Seconds `new` took: pinning the pool, creating the streams and, for
    /// the copy kernel, compiling it (paid once per streamer).
    pub fn pool_alloc_s(&self) -> f64 {
        self.pool_alloc_s
    }

    /// Streams `spec`'s blob into fresh device memory.
    pub fn load(&mut self, spec: &BlobSpec, opts: LoadOptions) -> Result<(DeviceBlob, LoadReport), KernelError> {
        self.load_with(spec, opts, None)
    }

    /// `load`, each worker waiting at a chunk until `readahead` has read
    /// past its end (cold blobs: the disk sees one sequential reader).
    pub fn load_after(
        &mut self,
        spec: &BlobSpec,
        opts: LoadOptions,
        readahead: &crate::Readahead,
    ) -> Result<(DeviceBlob, LoadReport), KernelError> {
        self.load_with(spec, opts, Some(&Gate(readahead)))
    }

    /// `load`, telling `sink` (GPU verification, `verify_gpu.rs`) where the
    /// device buffer is and when each chunk's copies are all queued.
    pub(crate) fn load_with(
        &mut self,
        spec: &BlobSpec,
        opts: LoadOptions,
        sink: Option<&dyn ChunkSink>,
    ) -> Result<(DeviceBlob, LoadReport), KernelError> {
        spec.check()?;
        if opts.threads == 0 || opts.threads > self.config.threads {
            return Err(KernelError::Shape {
                op: "load",
                detail: format!("threads {} outside 1..={}", opts.threads, self.config.threads),
            });
        }
        if opts.source == SourceMode::Resident {
            if opts.verify {
                return Err(KernelError::Shape {
                    op: "load",
                    detail: "resident blobs are verified on the GPU (GpuVerifier), not while the host copies".into(),
                });
            }
            return self.load_resident(spec, opts, sink);
        }
        if opts.source == SourceMode::Pread && self.config.write_combined && opts.verify {
            return Err(KernelError::Shape {
                op: "load",
                detail: "pread with verification hashes the slot, which must not be write-combined".into(),
            });
        }
        if opts.source == SourceMode::Register && spec.chunk_bytes % page_bytes() != 0 {
            return Err(KernelError::Shape {
                op: "load",
                detail: format!(
                    "register mode needs chunks of whole pages, not {} bytes",
                    spec.chunk_bytes
                ),
            });
        }
        let t0 = Instant::now();
        let path = spec.path;
        let io = |op: &'static str| {
            move |source| KernelError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let (file, len) = open_blob(spec)?;
        let map = if opts.source != SourceMode::Pread && len > 0 {
            // SAFETY: the mapping is read-only and private to this load. A
            // blob truncated by another process while mapped would fault
            // (SIGBUS); store blobs are immutable once written (renamed into
            // place and never modified), which is the invariant relied on.
            let m = unsafe { memmap2::Mmap::map(&file) }.map_err(io("mmap"))?;
            let _ = m.advise(memmap2::Advice::Sequential);
            Some(m)
        } else {
            None
        };
        let open_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let buffer = DeviceBuffer::new(&self.ctx, len as usize)?;
        let device_alloc_s = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        if let Some(k) = sink {
            k.begin(buffer.device_ptr(), &self.worker_streams())?;
        }
        let shared = Shared {
            sink,
            spec,
            source: match &map {
                Some(m) => Source::Map(&m[..]),
                None => Source::File(&file),
            },
            device_base: buffer.device_ptr(),
            verify: opts.verify,
            register: opts.source == SourceMode::Register,
            copy_granule: self.config.copy_granule_bytes,
            sync_copies: self.config.mover == Mover::Sync,
            pipeline: opts.pipeline,
            next_chunk: AtomicUsize::new(0),
            queued_bytes: AtomicU64::new(0),
            abort: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        };
        let ctx = &self.ctx;
        std::thread::scope(|s| {
            for worker in self.workers.iter_mut().take(opts.threads) {
                let shared = &shared;
                s.spawn(move || {
                    let run = ctx.bind_to_thread().map_err(KernelError::driver("cuCtxSetCurrent"));
                    let run = run.and_then(|()| worker.run(shared));
                    // Every copy this worker queued must land before the
                    // device buffer can be exposed or freed.
                    let synced = worker.drain();
                    if let Err(e) = run.and(synced) {
                        shared.fail(e);
                    }
                });
            }
        });
        // The sink's kernels read the buffer: they finish before it can be
        // exposed or freed, whatever happened. Every queued copy has landed
        // (the workers drained their streams).
        let copied = shared.queued_bytes.load(Ordering::Acquire);
        let sunk = sink.map_or(Ok(()), |k| k.finish(copied));
        let stream_s = t2.elapsed().as_secs_f64();
        // A sink's error (a leaf mismatch) is the cause of the workers'
        // errors (they were stopped by it), so it wins.
        if let Some(err) = sunk.err().or_else(|| shared.into_error()) {
            drop(buffer);
            return Err(err);
        }
        let report = LoadReport {
            bytes: len,
            threads: opts.threads,
            source: opts.source,
            mover: self.config.mover,
            verified: opts.verify,
            open_s,
            register_s: 0.0,
            device_alloc_s,
            stream_s,
            total_s: t0.elapsed().as_secs_f64(),
        };
        Ok((
            DeviceBlob {
                buffer,
                digest: spec.digest,
                size_bytes: len,
                verified: opts.verify,
            },
            report,
        ))
    }
}

enum Source<'a> {
    Map(&'a [u8]),
    File(&'a File),
}

/// Told about a load's progress by `Streamer::load_with`.
pub(crate) trait ChunkSink: Sync {
    /// Before any copy: the device buffer's address and the workers' streams.
    fn begin(&self, device_base: u64, streams: &[Arc<CudaStream>]) -> Result<(), KernelError>;
    /// A worker is about to read chunk `chunk` (bytes `start..end`); it may
    /// be held back here (read-ahead of cold blobs), and an error stops the
    /// load (the sink found a mismatch): no further copies are queued.
    fn chunk_start(&self, _chunk: usize, _end: u64) -> Result<(), KernelError> {
        Ok(())
    }
    /// Every copy of `chunk` is queued on the stream of the calling worker.
    fn chunk_queued(&self, chunk: usize, stream: &Arc<CudaStream>) -> Result<(), KernelError>;
    /// After the workers stopped and `copied_bytes` landed: wait for the
    /// sink's device work and report.
    fn finish(&self, copied_bytes: u64) -> Result<(), KernelError>;
}

/// Holds workers back until the read-ahead has passed their chunk.
struct Gate<'a>(&'a crate::Readahead);

impl ChunkSink for Gate<'_> {
    fn begin(&self, _: u64, _: &[Arc<CudaStream>]) -> Result<(), KernelError> {
        Ok(())
    }
    fn chunk_start(&self, _chunk: usize, end: u64) -> Result<(), KernelError> {
        self.0.wait_for(end);
        Ok(())
    }
    fn chunk_queued(&self, _: usize, _: &Arc<CudaStream>) -> Result<(), KernelError> {
        Ok(())
    }
    fn finish(&self, _: u64) -> Result<(), KernelError> {
        Ok(())
    }
}

struct Shared<'a> {
    sink: Option<&'a dyn ChunkSink>,
    spec: &'a BlobSpec<'a>,
    source: Source<'a>,
    device_base: cudarc::driver::sys::CUdeviceptr,
    verify: bool,
    register: bool,
    copy_granule: usize,
    sync_copies: bool,
    pipeline: Pipeline,
    next_chunk: AtomicUsize,
    /// Bytes whose copy was queued (all landed once the workers drained).
    queued_bytes: AtomicU64,
    abort: AtomicBool,
    errors: Mutex<Vec<KernelError>>,
}

impl Shared<'_> {
    fn fail(&self, e: KernelError) {
        self.abort.store(true, Ordering::Release);
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// The error to report: a chunk mismatch (lowest chunk first) wins over
    /// the I/O or driver errors of workers that were stopped by it.
    fn into_error(self) -> Option<KernelError> {
        let mut errors = self.errors.into_inner().unwrap_or_else(|p| p.into_inner());
        errors.sort_by_key(|e| match e {
            KernelError::ChunkMismatch { chunk, .. } => (0, *chunk),
            _ => (1, 0),
        });
        errors.into_iter().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::digest::SHA256;
    use std::io::Write;
    use std::path::PathBuf;

    fn temp_file(bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("cnse-kernels-{}-{}", std::process::id(), bytes.len()));
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn chunk_digests_cover_the_file_with_a_short_tail() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let p = temp_file(&data);
        let (len, d) = hash_chunks(&p, 4096, 3).unwrap();
        assert_eq!(len, 10_000);
        assert_eq!(d.len(), 3);
        assert_eq!(&d[2][..], ring::digest::digest(&SHA256, &data[8192..]).as_ref());
        let spec = OwnedSpec::from_file(&p, 4096, 2).unwrap();
        assert_eq!(&spec.digest[..], ring::digest::digest(&SHA256, &data).as_ref());
        spec.as_spec().check().unwrap();
        let mut short = spec.clone();
        short.chunk_digests.pop();
        let msg = short.as_spec().check().unwrap_err().to_string();
        assert!(msg.contains("need 3 chunk digests, manifest has 2"), "{msg}");
        std::fs::remove_file(p).unwrap();
    }

    /// The file check every load starts with (staged and resident alike).
    #[test]
    fn a_blob_file_is_opened_with_its_length_checked() {
        let data = vec![5u8; 12_345];
        let p = temp_file(&data);
        let spec = OwnedSpec::from_file(&p, 4096, 1).unwrap();
        let (_, len) = open_blob(&spec.as_spec()).unwrap();
        assert_eq!(len, 12_345);
        let wrong = BlobSpec {
            size_bytes: 12_346,
            ..spec.as_spec()
        };
        let err = open_blob(&wrong).unwrap_err();
        assert!(matches!(err, KernelError::Spec { .. }), "{err}");
        assert!(
            err.to_string().contains("file has 12345 bytes, manifest says 12346"),
            "{err}"
        );
        std::fs::remove_file(&p).unwrap();
        let err = open_blob(&spec.as_spec()).unwrap_err();
        assert!(matches!(err, KernelError::Io { op: "open", .. }), "{err}");
        let err = open_with_len(&p, "open for read-ahead", "stat for read-ahead").unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::Io {
                    op: "open for read-ahead",
                    ..
                }
            ),
            "{err}"
        );
    }

    /// NVRTC needs no GPU: where it is present the copy kernel must compile.
    #[test]
    fn copy_cu_compiles_with_nvrtc() {
        if !crate::device::nvrtc_available() {
            println!("skipped: no NVRTC library");
            return;
        }
        let ptx = crate::device::compile("copy.cu", COPY_CU, "compute_90".into()).unwrap();
        assert!(ptx.to_src().contains(".entry copy_from_host"));
    }

    #[test]
    fn config_limits_are_enforced() {
        assert!(StreamerConfig {
            slots_per_thread: 1,
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(StreamerConfig {
            threads: 0,
            ..Default::default()
        }
        .check()
        .is_err());
        assert!(StreamerConfig {
            slot_bytes: 1000,
            ..Default::default()
        }
        .check()
        .is_err());
        StreamerConfig::default().check().unwrap();
    }

    #[test]
    fn streamer_without_a_driver_says_so() {
        if crate::cuda_available() {
            println!("skipped: a CUDA driver is present on this machine");
            return;
        }
        let msg = Streamer::new(0, StreamerConfig::default()).err().unwrap().to_string();
        assert_eq!(msg, "no CUDA driver found (libcuda.so could not be loaded)");
    }
}
