//! A load of a resident blob (`SourceMode::Resident`): the blob's pages are
//! registered once (`resident.rs`) and every load only queues DMA from
//! them, with the copy kernel or the copy engines, over the streamer's
//! streams; `opts.threads` threads (1 or 2 suffice) take whole chunks and
//! queue their copies, and the calling thread waits on blocking events, so
//! the host does nearly nothing while the bytes move.
//!
//! The first load of a blob registers it: whole, ahead of the copies
//! (`ResidentCache::get`), or with `ResidentOptions::overlap` chunk by chunk
//! by the queueing threads, each chunk's copy queued right behind its
//! registration; such a load that fails unregisters what it registered
//! once its copies have landed.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{result, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::resident::{register_range, Entry, Piece, ResidentCache, ResidentOptions, ResidentStats};
use super::{page_bytes, BlobSpec, ChunkSink, DeviceBlob, LoadOptions, LoadReport, Streamer, COPY_THREADS};
use crate::pinned::DeviceBuffer;
use crate::KernelError;

/// What the threads of one resident load share.
struct Job<'a> {
    spec: &'a BlobSpec<'a>,
    entry: &'a Entry,
    sink: Option<&'a dyn ChunkSink>,
    streams: &'a [Arc<CudaStream>],
    copy_fn: Option<&'a CudaFunction>,
    /// A blob being admitted by this load: each chunk is registered by the
    /// thread that copies it, and its piece recorded here (by chunk).
    fresh: Option<&'a Mutex<Vec<Option<Piece>>>>,
    /// Time spent in those registrations, summed over the threads.
    register_ns: AtomicU64,
    device_base: u64,
    next_chunk: AtomicUsize,
    queued_bytes: AtomicU64,
    abort: AtomicBool,
    errors: Mutex<Vec<KernelError>>,
}

impl Streamer {
    /// Resident blobs: a byte budget, how new blobs are registered. A
    /// smaller budget evicts (unregisters and unmaps) the least recently
    /// loaded blobs at once; 0 evicts them all.
    pub fn set_resident(&mut self, options: ResidentOptions) -> Result<(), KernelError> {
        self.resident.set_options(options)
    }

    pub fn resident_options(&self) -> ResidentOptions {
        self.resident.options
    }

    pub fn resident_stats(&self) -> ResidentStats {
        self.resident.stats
    }

    pub(super) fn load_resident(
        &mut self,
        spec: &BlobSpec,
        opts: LoadOptions,
        sink: Option<&dyn ChunkSink>,
    ) -> Result<(DeviceBlob, LoadReport), KernelError> {
        let t0 = Instant::now();
        let path = spec.path;
        let (file, len) = super::open_blob(spec)?;
        self.ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let streams = self.worker_streams();
        let copy_fn = self.workers.first().and_then(|w| w.copy_fn.clone());
        let key = ResidentCache::key(path, &file, len, spec.digest)?;
        let overlap = self.resident.options.overlap && spec.chunk_bytes % page_bytes() == 0;
        let mut register_s = 0.0;
        let hit = self.resident.find(&key);
        let mut fresh: Option<Entry> = None;
        if hit.is_none() && overlap {
            // Registered chunk by chunk by the queueing threads below.
            self.resident.make_room(path, len)?;
            fresh = Some(self.resident.map(path, &file, key)?);
        }
        let slots: Option<Mutex<Vec<Option<Piece>>>> =
            fresh.as_ref().map(|_| Mutex::new(vec![None; spec.chunk_digests.len()]));
        let entry: &Entry = match (hit, &fresh) {
            (Some(i), _) => self.resident.entry(i),
            (None, Some(e)) => e,
            (None, None) => {
                let (e, s) = self.resident.get(path, &file, key)?;
                register_s = s;
                e
            }
        };
        let open_s = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let buffer = DeviceBuffer::new(&self.ctx, len as usize)?;
        let device_alloc_s = t1.elapsed().as_secs_f64();

        let t2 = Instant::now();
        if let Some(k) = sink {
            k.begin(buffer.device_ptr(), &streams)?;
        }
        let job = Job {
            spec,
            entry,
            sink,
            streams: &streams,
            copy_fn: copy_fn.as_ref(),
            fresh: slots.as_ref(),
            register_ns: AtomicU64::new(0),
            device_base: buffer.device_ptr(),
            next_chunk: AtomicUsize::new(0),
            queued_bytes: AtomicU64::new(0),
            abort: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
        };
        let ctx = &self.ctx;
        std::thread::scope(|s| {
            for _ in 0..opts.threads {
                let job = &job;
                s.spawn(move || {
                    let run = ctx.bind_to_thread().map_err(KernelError::driver("cuCtxSetCurrent"));
                    if let Err(e) = run.and_then(|()| job.run()) {
                        job.fail(e);
                    }
                });
            }
        });
        // Every queued copy lands before the buffer can be exposed or
        // freed; a blocking event lets this thread sleep meanwhile.
        let drained = drain(ctx, &streams);
        let copied = job.queued_bytes.load(Ordering::Acquire);
        let sunk = sink.map_or(Ok(()), |k| k.finish(copied));
        let stream_s = t2.elapsed().as_secs_f64();
        let failed = job
            .errors
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .next();
        let register_ns = job.register_ns.load(Ordering::Relaxed);
        let drained_ok = drained.is_ok();
        let outcome = sunk.err().or(failed).or(drained.err());
        if let (Some(mut e), Some(slots)) = (fresh, slots) {
            e.pieces = slots
                .into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .into_iter()
                .flatten()
                .collect();
            register_s = register_ns as f64 / 1e9;
            match outcome {
                None => {
                    self.resident.insert(e, register_s);
                }
                // Every copy has landed: the pieces can go.
                Some(_) if drained_ok => {
                    let _ = self.resident.discard(e);
                }
                // A copy may still read them: leave them pinned and mapped
                // until the process exits.
                Some(_) => std::mem::forget(e),
            }
        }
        if let Some(err) = outcome {
            drop(buffer);
            return Err(err);
        }
        let report = LoadReport {
            bytes: len,
            threads: opts.threads,
            source: opts.source,
            mover: self.config.mover,
            verified: false,
            open_s,
            register_s,
            device_alloc_s,
            stream_s,
            total_s: t0.elapsed().as_secs_f64(),
        };
        let blob = DeviceBlob {
            buffer,
            digest: spec.digest,
            size_bytes: len,
            verified: false,
        };
        Ok((blob, report))
    }
}

/// Waits for every stream through a blocking-sync event (the thread sleeps
/// instead of spinning in the driver).
fn drain(ctx: &Arc<cudarc::driver::CudaContext>, streams: &[Arc<CudaStream>]) -> Result<(), KernelError> {
    let mut r = Ok(());
    for s in streams {
        let waited = ctx
            .new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .and_then(|ev| ev.record(s).and_then(|()| ev.synchronize()))
            .map_err(KernelError::driver("cuEventSynchronize (blocking)"));
        // Should the event fail, the stream is still drained before the
        // device buffer or the pages can go.
        let waited = waited.or_else(|e| {
            s.synchronize()
                .map_err(KernelError::driver("cuStreamSynchronize"))
                .and(Err(e))
        });
        r = r.and(waited);
    }
    r
}

impl Job<'_> {
    fn fail(&self, e: KernelError) {
        self.abort.store(true, Ordering::Release);
        self.errors.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }

    /// Takes whole chunks and queues their copies, chunk `c` on stream
    /// `c % streams`, so even one thread keeps every stream busy.
    fn run(&self) -> Result<(), KernelError> {
        let chunks = self.spec.chunk_digests.len();
        loop {
            if self.abort.load(Ordering::Acquire) {
                return Ok(());
            }
            let chunk = self.next_chunk.fetch_add(1, Ordering::Relaxed);
            if chunk >= chunks {
                return Ok(());
            }
            let (start, end) = self.spec.chunk_range(chunk);
            if let Some(k) = self.sink {
                k.chunk_start(chunk, end)?;
            }
            let stream = &self.streams[chunk % self.streams.len()];
            if let Some(slots) = self.fresh {
                let t = Instant::now();
                let device_ptr = register_range(&self.entry.bytes()[start as usize..end as usize])?;
                self.register_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                slots.lock().unwrap_or_else(|p| p.into_inner())[chunk] = Some(Piece {
                    start,
                    len: end - start,
                    device_ptr,
                });
                self.copy(stream, device_ptr, start, end)?;
                self.queued(chunk, stream, end - start)?;
                continue;
            }
            // Pieces are sorted and cover the blob; a chunk may straddle two.
            let first = self.entry.pieces.partition_point(|p| p.start + p.len <= start);
            for p in &self.entry.pieces[first..] {
                if p.start >= end {
                    break;
                }
                let (from, to) = (start.max(p.start), end.min(p.start + p.len));
                self.copy(stream, p.device_ptr + (from - p.start), from, to)?;
            }
            self.queued(chunk, stream, end - start)?;
        }
    }

    /// Every copy of `chunk` is queued on `stream`.
    fn queued(&self, chunk: usize, stream: &Arc<CudaStream>, bytes: u64) -> Result<(), KernelError> {
        self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        if let Some(k) = self.sink.filter(|_| !self.abort.load(Ordering::Acquire)) {
            k.chunk_queued(chunk, stream)?;
        }
        Ok(())
    }

    /// Queues the copy of blob bytes `from..to` (registered; `src_dev` is
    /// the device's address of byte `from`) into the device buffer.
    fn copy(&self, stream: &Arc<CudaStream>, src_dev: u64, from: u64, to: u64) -> Result<(), KernelError> {
        let dst = self.device_base + from;
        let bytes = to - from;
        if let Some(f) = self.copy_fn.filter(|_| dst % 16 == 0 && src_dev % 16 == 0) {
            let blocks = (bytes / 16).div_ceil(COPY_THREADS as u64 * 4).clamp(1, 1024) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (COPY_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(f);
            b.arg(&src_dev).arg(&dst).arg(&bytes);
            // SAFETY: copy_from_host(const uint4*, uint4*, u64) reads
            // `bytes` bytes at `src_dev`, a device mapping of registered
            // pages inside one piece, and writes dst..dst+bytes inside the
            // device buffer; both are 16-byte aligned (checked above). The
            // pages stay registered (the entry is evicted only between
            // loads) and the buffer alive until `drain` has waited.
            unsafe { b.launch(cfg) }.map_err(KernelError::driver("launch copy_from_host (resident)"))?;
            return Ok(());
        }
        let src = &self.entry.bytes()[from as usize..to as usize];
        // SAFETY: `src` lies in registered (page-locked) pages of the
        // entry, which stay registered and mapped until after `drain`; the
        // device range lies inside the buffer of `size_bytes`.
        unsafe { result::memcpy_htod_async(dst, src, stream.cu_stream()) }
            .map_err(KernelError::driver("cuMemcpyHtoDAsync (resident)"))?;
        Ok(())
    }
}
