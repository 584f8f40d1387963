//! One worker of the streamer: takes whole chunks, fills its pinned slots
//! from the page cache (hashing on the way when the host verifies), and
//! queues each full slot's transfer on its stream; a slot is refilled only
//! after the event behind its previous copy has fired.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;

use cnse_store::ChunkHasher;
use cudarc::driver::{result, LaunchConfig, PushKernelArg};

use super::{Pipeline, Shared, Slot, Source, Worker, COPY_THREADS, REGISTER_PIECE_MAX, SUB_BYTES};
use crate::KernelError;

impl Worker {
    pub(super) fn run(&mut self, sh: &Shared) -> Result<(), KernelError> {
        let chunks = sh.spec.chunk_digests.len();
        loop {
            if sh.abort.load(Ordering::Acquire) {
                return Ok(());
            }
            let chunk = sh.next_chunk.fetch_add(1, Ordering::Relaxed);
            if chunk >= chunks {
                return Ok(());
            }
            if let Some(k) = sh.sink {
                k.chunk_start(chunk, sh.spec.chunk_range(chunk).1)?;
            }
            self.chunk(sh, chunk)?;
            if let Some(k) = sh.sink.filter(|_| !sh.abort.load(Ordering::Acquire)) {
                k.chunk_queued(chunk, &self.stream)?;
            }
        }
    }

    fn chunk(&mut self, sh: &Shared, chunk: usize) -> Result<(), KernelError> {
        let (start, end) = sh.spec.chunk_range(chunk);
        // The manifest's definition of a chunk digest: plain SHA-256, or
        // the Merkle root over the chunk's leaves (format 3).
        let mut hasher = sh.verify.then(|| ChunkHasher::new(sh.spec.scheme));
        // Register mode locks whole chunks (up to REGISTER_PIECE_MAX) to
        // amortise the registration call; copy mode is bounded by the slot.
        let register = sh.register && sh.pipeline != Pipeline::DmaOnly;
        let piece_max = if register {
            REGISTER_PIECE_MAX
        } else {
            self.slots[0].buf.len() as u64
        };
        let mut piece = start;
        while piece < end {
            if sh.abort.load(Ordering::Acquire) {
                return Ok(());
            }
            let piece_len = (end - piece).min(piece_max) as usize;
            if register {
                // No staging: the piece is its own source, so nothing waits.
                self.register_piece(sh, piece, piece_len, hasher.as_mut())?;
            } else {
                let n = self.slots.len();
                let slot = &mut self.slots[self.next_slot];
                self.next_slot = (self.next_slot + 1) % n;
                slot.retire()?;
                self.stage_piece(sh, piece, piece_len, hasher.as_mut())?;
            }
            piece += piece_len as u64;
            sh.queued_bytes.fetch_add(piece_len as u64, Ordering::AcqRel);
        }
        if let Some(h) = hasher {
            if h.finish() != sh.spec.chunk_digests[chunk] {
                sh.fail(KernelError::ChunkMismatch {
                    path: sh.spec.path.to_path_buf(),
                    chunk,
                    offset: start,
                    end,
                });
            }
        }
        Ok(())
    }

    /// The slot taken last by `chunk` (the one before `next_slot`).
    fn current(&mut self) -> &mut Slot {
        let n = self.slots.len();
        &mut self.slots[(self.next_slot + n - 1) % n]
    }

    /// Copy mode: fill the pinned slot (hashing on the way), then DMA it.
    fn stage_piece(
        &mut self,
        sh: &Shared,
        piece: u64,
        len: usize,
        hasher: Option<&mut ChunkHasher>,
    ) -> Result<(), KernelError> {
        let stream = self.stream.clone();
        let copy_fn = self.copy_fn.clone();
        let slot = self.current();
        let dst = &mut slot.buf.as_mut_slice()[..len];
        if sh.pipeline != Pipeline::DmaOnly {
            fill(sh, piece, dst, hasher)?;
        }
        if sh.pipeline == Pipeline::HostOnly {
            return Ok(());
        }
        let to = sh.device_base + piece;
        if sh.sync_copies {
            // SAFETY: `dst` is pinned and the copy completes before the call
            // returns; the device range lies inside the buffer.
            unsafe { result::memcpy_htod_sync(to, &*dst) }.map_err(KernelError::driver("cuMemcpyHtoD"))?;
            return Ok(());
        }
        if let Some(f) = copy_fn.filter(|_| to % 16 == 0) {
            let bytes = len as u64;
            let blocks = (bytes / 16).div_ceil(COPY_THREADS as u64 * 4).clamp(1, 1024) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (COPY_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&slot.device_src).arg(&to).arg(&bytes);
            // SAFETY: copy_from_host(const uint4*, uint4*, u64) reads `len`
            // bytes of this slot (device-mapped pinned memory, 4 KiB aligned)
            // and writes the 16-byte aligned device range to..to+len inside
            // the buffer; the slot stays untouched until `copied` fires.
            unsafe { b.launch(cfg) }.map_err(KernelError::driver("launch copy_from_host"))?;
            slot.copied
                .record(&stream)
                .map_err(KernelError::driver("cuEventRecord"))?;
            slot.in_flight = true;
            return Ok(());
        }
        // SAFETY: `dst` is pinned memory that stays untouched until `copied`
        // fires (`retire` waits for it before the slot is refilled, and
        // `drain` before the pool or the device buffer can be dropped); the
        // device range piece..piece+len lies inside the buffer allocated for
        // `size_bytes`.
        unsafe { result::memcpy_htod_async(sh.device_base + piece, &*dst, stream.cu_stream()) }
            .map_err(KernelError::driver("cuMemcpyHtoDAsync"))?;
        slot.copied
            .record(&stream)
            .map_err(KernelError::driver("cuEventRecord"))?;
        slot.in_flight = true;
        Ok(())
    }

    /// Register mode: page-lock the mapped piece, DMA straight from it, and
    /// hash it while the copy engine reads it.
    fn register_piece(
        &mut self,
        sh: &Shared,
        piece: u64,
        len: usize,
        hasher: Option<&mut ChunkHasher>,
    ) -> Result<(), KernelError> {
        let Source::Map(map) = sh.source else {
            unreachable!("register mode always maps the blob")
        };
        let src = &map[piece as usize..piece as usize + len];
        // SAFETY: `src` is a live read-only mapping starting on a page
        // (chunk starts are page multiples, checked in `load`, and pieces
        // are whole chunks or REGISTER_PIECE_MAX); READ_ONLY tells the
        // driver the device only reads it. `drain` unregisters it after the
        // worker's stream is idle, before the map is dropped at the end of
        // `load`.
        unsafe {
            cudarc::driver::sys::cuMemHostRegister_v2(
                src.as_ptr() as *mut std::ffi::c_void,
                len,
                cudarc::driver::sys::CU_MEMHOSTREGISTER_READ_ONLY,
            )
        }
        .result()
        .map_err(KernelError::driver("cuMemHostRegister (read-only page cache)"))?;
        self.registered.push(src.as_ptr() as usize);
        if sh.pipeline != Pipeline::HostOnly {
            // SAFETY: `src` is page-locked (registered above) and stays so
            // until `drain` has synchronised this stream; the device range
            // lies inside the buffer.
            unsafe { result::memcpy_htod_async(sh.device_base + piece, src, self.stream.cu_stream()) }
                .map_err(KernelError::driver("cuMemcpyHtoDAsync"))?;
        }
        if let Some(h) = hasher {
            h.update(src);
        }
        Ok(())
    }

    /// Waits for every copy of this worker and unregisters what it
    /// registered; the slots are free afterwards.
    pub(super) fn drain(&mut self) -> Result<(), KernelError> {
        let mut r = self
            .stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"));
        for s in &mut self.slots {
            s.in_flight = false;
        }
        if r.is_err() {
            // A copy may still read the pieces: leave them registered
            // (pinned until the process exits) rather than unpin them
            // under the device.
            self.registered.clear();
        }
        for ptr in self.registered.drain(..) {
            // SAFETY: `ptr` was registered by `register_piece`, and every
            // copy from it has completed (the stream synchronised above).
            let u = unsafe { cudarc::driver::sys::cuMemHostUnregister(ptr as *mut std::ffi::c_void) }
                .result()
                .map_err(KernelError::driver("cuMemHostUnregister"));
            r = r.and(u);
        }
        r
    }
}

impl Slot {
    /// Waits for the slot's last copy.
    pub(super) fn retire(&mut self) -> Result<(), KernelError> {
        if self.in_flight {
            self.copied
                .synchronize()
                .map_err(KernelError::driver("cuEventSynchronize"))?;
            self.in_flight = false;
        }
        Ok(())
    }
}

pub(crate) fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Reads blob bytes `offset..offset + dst.len()` into the slot, hashing them
/// sub-block by sub-block so each is hashed and copied while cache-hot.
fn fill(sh: &Shared, offset: u64, dst: &mut [u8], mut hasher: Option<&mut ChunkHasher>) -> Result<(), KernelError> {
    match sh.source {
        Source::Map(map) => {
            let src = &map[offset as usize..offset as usize + dst.len()];
            match hasher {
                Some(h) => {
                    for (s, d) in src.chunks(SUB_BYTES).zip(dst.chunks_mut(SUB_BYTES)) {
                        h.update(s);
                        d.copy_from_slice(s);
                    }
                }
                None => {
                    for (s, d) in src.chunks(sh.copy_granule).zip(dst.chunks_mut(sh.copy_granule)) {
                        d.copy_from_slice(s);
                    }
                }
            }
        }
        Source::File(file) => {
            let mut at = offset;
            for d in dst.chunks_mut(SUB_BYTES) {
                file.read_exact_at(d, at).map_err(|source| KernelError::Io {
                    op: "read",
                    path: sh.spec.path.to_path_buf(),
                    source,
                })?;
                if let Some(h) = hasher.as_deref_mut() {
                    h.update(d);
                }
                at += d.len() as u64;
            }
        }
    }
    Ok(())
}
