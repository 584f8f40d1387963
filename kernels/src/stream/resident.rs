//! Resident blobs: mappings of blob files whose page-cache pages stay
//! page-locked (`cuMemHostRegister`, read-only, device-mapped) across loads.
//!
//! Registering the page cache in place spares the host every copy, but the
//! registration itself (page pinning, serialised in the driver) is slow;
//! paid on every load it caps a load at what the driver pins per second.
//! Store blobs are content-addressed and never modified in place, so a
//! blob's registration can outlive one load: the first load of a blob
//! (`SourceMode::Resident`) maps and registers it and keeps the mapping in
//! this cache; later loads of the same file (device, inode, size and the
//! manifest's digest) only queue DMA from the registered pages, on one or
//! two host threads.
//!
//! Bounded: at most `budget_bytes` registered and `RESIDENT_ENTRIES_MAX`
//! entries; admitting a blob evicts the least recently loaded ones first
//! (each eviction unregisters and unmaps). A blob larger than the budget is
//! refused with an error. An entry owns its mapping, so `store gc`
//! deleting the file leaves the pages valid (Linux keeps an unlinked file's
//! pages while mapped); they go at eviction or when the streamer is dropped.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cudarc::driver::sys;
use cudarc::driver::CudaContext;

use crate::KernelError;

/// Upper bound of resident blobs per streamer.
pub const RESIDENT_ENTRIES_MAX: usize = 1024;
/// Upper bound of the threads that register a blob's pieces.
pub const REGISTER_THREADS_MAX: usize = 16;
/// Smallest registration piece (also the granule of `piece_bytes`).
pub const REGISTER_PIECE_MIN: u64 = 2 << 20;

/// How the pages are prepared before they are registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefault {
    /// Plain mapping: the driver faults the pages in while it pins them.
    None,
    /// `MAP_POPULATE`: the kernel fills the page tables at `mmap`.
    Populate,
    /// `madvise(MADV_HUGEPAGE)` on the mapping (file THP, where the kernel
    /// has it).
    HugePage,
}

impl std::fmt::Display for Prefault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Prefault::None => "plain mmap",
            Prefault::Populate => "MAP_POPULATE",
            Prefault::HugePage => "MADV_HUGEPAGE",
        })
    }
}

/// Resident-blob knobs of a streamer (`Streamer::set_resident`).
#[derive(Clone, Copy, Debug)]
pub struct ResidentOptions {
    /// Most bytes kept registered; 0 turns residency off (and evicts all).
    pub budget_bytes: u64,
    /// Threads that register a new blob's pieces in parallel.
    pub register_threads: usize,
    /// Bytes per registration call, a multiple of `REGISTER_PIECE_MIN`;
    /// 0 registers the whole blob in one call.
    pub piece_bytes: u64,
    pub prefault: Prefault,
    /// Register a new blob chunk by chunk inside its first load, each
    /// chunk's copy queued right behind its registration (pieces are the
    /// manifest's chunks; `piece_bytes`, `register_threads` and `prefault`
    /// other than the mapping's are then unused), instead of registering
    /// it whole before the copies. Needs chunks of whole pages; otherwise
    /// the blob is registered ahead.
    pub overlap: bool,
}

impl Default for ResidentOptions {
    fn default() -> Self {
        Self {
            budget_bytes: 0,
            register_threads: 2,
            piece_bytes: 64 << 20,
            prefault: Prefault::None,
            overlap: false,
        }
    }
}

impl ResidentOptions {
    pub(crate) fn check(&self) -> Result<(), KernelError> {
        let bad = |detail: String| Err(KernelError::Shape { op: "resident", detail });
        if self.register_threads == 0 || self.register_threads > REGISTER_THREADS_MAX {
            return bad(format!(
                "register threads {} outside 1..={REGISTER_THREADS_MAX}",
                self.register_threads
            ));
        }
        if self.piece_bytes % REGISTER_PIECE_MIN != 0 {
            return bad(format!(
                "piece of {} bytes is not a multiple of {REGISTER_PIECE_MIN}",
                self.piece_bytes
            ));
        }
        Ok(())
    }
}

/// What the cache did since the streamer was made.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResidentStats {
    pub entries: usize,
    pub resident_bytes: u64,
    /// Loads that found their blob resident.
    pub hits: u64,
    /// Loads that registered their blob first.
    pub misses: u64,
    /// `cuMemHostRegister` calls that succeeded (pieces).
    pub registrations: u64,
    /// `cuMemHostUnregister` calls (pieces), at eviction or drop.
    pub unregistrations: u64,
    /// Blobs evicted to make room or by a smaller budget.
    pub evictions: u64,
    /// Seconds of the last admission: map, prefault and registration.
    pub last_register_s: f64,
    /// Seconds spent unregistering, in all.
    pub unregister_s: f64,
}

/// Identity of a resident blob: the file (device and inode, so a file
/// replaced under the same name is a different blob), its size and the
/// manifest's digest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    digest: [u8; 32],
}

/// One registered range of a resident mapping.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    /// Offset in the blob.
    pub start: u64,
    pub len: u64,
    /// The device's address of the piece's first byte (copy kernel).
    pub device_ptr: u64,
}

pub(crate) struct Entry {
    key: Key,
    /// Kept open and registered until eviction; never written.
    map: memmap2::Mmap,
    pub pieces: Vec<Piece>,
    last_use: u64,
}

impl Entry {
    pub fn bytes(&self) -> &[u8] {
        &self.map[..]
    }
}

/// The streamer's resident blobs.
pub(crate) struct ResidentCache {
    ctx: Arc<CudaContext>,
    pub options: ResidentOptions,
    entries: Vec<Entry>,
    clock: u64,
    pub stats: ResidentStats,
}

impl ResidentCache {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Self {
            ctx,
            options: ResidentOptions::default(),
            entries: Vec::new(),
            clock: 0,
            stats: ResidentStats::default(),
        }
    }

    pub fn set_options(&mut self, options: ResidentOptions) -> Result<(), KernelError> {
        options.check()?;
        self.options = options;
        self.evict_to(options.budget_bytes, 0)
    }

    /// The identity of `file` (already opened at `path`, `size` bytes).
    pub fn key(path: &Path, file: &File, size: u64, digest: [u8; 32]) -> Result<Key, KernelError> {
        let meta = file.metadata().map_err(|source| KernelError::Io {
            op: "stat",
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size,
            digest,
        })
    }

    /// The index of `key`'s entry, counted as a hit and marked used.
    pub fn find(&mut self, key: &Key) -> Option<usize> {
        self.clock += 1;
        let i = self.entries.iter().position(|e| e.key == *key)?;
        self.stats.hits += 1;
        self.entries[i].last_use = self.clock;
        Some(i)
    }

    pub fn entry(&self, i: usize) -> &Entry {
        &self.entries[i]
    }

    /// The entry of `key`, after mapping and registering it (serially,
    /// ahead of any copy) if it was not resident; `register_s` is the time
    /// spent admitting it (0 on a hit).
    pub fn get(&mut self, path: &Path, file: &File, key: Key) -> Result<(&Entry, f64), KernelError> {
        if let Some(i) = self.find(&key) {
            return Ok((&self.entries[i], 0.0));
        }
        self.make_room(path, key.size)?;
        let t0 = Instant::now();
        let mut entry = self.map(path, file, key)?;
        self.register_pieces(&mut entry)?;
        let register_s = t0.elapsed().as_secs_f64();
        Ok((self.insert(entry, register_s), register_s))
    }

    /// Checks that a blob of `size` bytes fits the budget and evicts the
    /// least recently used blobs until it fits beside the rest.
    pub fn make_room(&mut self, path: &Path, size: u64) -> Result<(), KernelError> {
        let budget = self.options.budget_bytes;
        if size == 0 {
            return Err(KernelError::Spec {
                path: path.to_path_buf(),
                detail: "an empty blob has no pages to make resident".into(),
            });
        }
        if size > budget {
            return Err(KernelError::Spec {
                path: path.to_path_buf(),
                detail: format!(
                    "a blob of {size} bytes cannot be made resident within a budget of {budget} bytes \
                     (resident blobs need a budget at least as large as the blob; 0 turns them off)"
                ),
            });
        }
        self.evict_to(budget - size, 1)
    }

    /// Adds a mapped and registered entry (after `make_room`).
    pub fn insert(&mut self, entry: Entry, register_s: f64) -> &Entry {
        self.stats.last_register_s = register_s;
        self.stats.misses += 1;
        self.stats.registrations += entry.pieces.len() as u64;
        self.stats.entries += 1;
        self.stats.resident_bytes += entry.key.size;
        self.entries.push(entry);
        self.entries.last().expect("pushed above")
    }

    /// Unregisters the pieces of an entry that never made it into the
    /// cache (a failed load that registered it chunk by chunk).
    pub fn discard(&mut self, entry: Entry) -> Result<(), KernelError> {
        self.stats.registrations += entry.pieces.len() as u64;
        self.release(entry)
    }

    /// Evicts the least recently used entries until at most `bytes` stay
    /// registered and `slots` more entries fit.
    fn evict_to(&mut self, bytes: u64, slots: usize) -> Result<(), KernelError> {
        while self.stats.resident_bytes > bytes || self.entries.len() + slots > RESIDENT_ENTRIES_MAX {
            let Some(i) = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_use) else {
                break;
            };
            let e = self.entries.swap_remove(i);
            self.stats.entries -= 1;
            self.stats.resident_bytes -= e.key.size;
            self.stats.evictions += 1;
            self.release(e)?;
        }
        Ok(())
    }

    /// Unregisters an entry's pieces, then unmaps it (drop). No copy reads
    /// it: every load drains its streams before it returns.
    fn release(&mut self, e: Entry) -> Result<(), KernelError> {
        self.ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let t0 = Instant::now();
        let mut r = Ok(());
        for p in &e.pieces {
            let ptr = e.map[p.start as usize..].as_ptr() as *mut std::ffi::c_void;
            // SAFETY: `ptr` is the start of a range `admit` registered in
            // this context; no copy from it is in flight (loads drain their
            // streams before returning), and the mapping is still alive.
            let u = unsafe { sys::cuMemHostUnregister(ptr) }
                .result()
                .map_err(KernelError::driver("cuMemHostUnregister (resident blob)"));
            self.stats.unregistrations += u.is_ok() as u64;
            r = r.and(u);
        }
        self.stats.unregister_s += t0.elapsed().as_secs_f64();
        if r.is_err() {
            // Pages that may still be registered keep their mapping (leaked
            // until the process exits) so no later mapping reuses the range.
            std::mem::forget(e);
        }
        r
    }

    /// Maps `file` (prefaulted as the options say); nothing registered yet.
    pub fn map(&self, path: &Path, file: &File, key: Key) -> Result<Entry, KernelError> {
        let o = self.options;
        let io = |op: &'static str| {
            move |source| KernelError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        };
        let mut mo = memmap2::MmapOptions::new();
        if o.prefault == Prefault::Populate {
            mo.populate();
        }
        // SAFETY: read-only shared mapping of a store blob. Blobs are
        // immutable once renamed into place (never written or truncated in
        // place), which is the invariant relied on; an unlinked file keeps
        // its pages while mapped.
        let map = unsafe { mo.map(file) }.map_err(io("mmap"))?;
        if map.len() as u64 != key.size {
            return Err(KernelError::Spec {
                path: path.to_path_buf(),
                detail: format!("mapped {} bytes, expected {}", map.len(), key.size),
            });
        }
        if o.prefault == Prefault::HugePage {
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        Ok(Entry {
            key,
            map,
            pieces: Vec::new(),
            last_use: self.clock,
        })
    }

    /// Registers a mapped entry piece by piece with `register_threads`
    /// threads; on an error, nothing stays registered.
    fn register_pieces(&self, entry: &mut Entry) -> Result<(), KernelError> {
        let o = self.options;
        let key = entry.key;
        let piece = if o.piece_bytes == 0 { key.size } else { o.piece_bytes };
        let count = key.size.div_ceil(piece) as usize;
        let slots: Mutex<Vec<Option<Piece>>> = Mutex::new(vec![None; count]);
        let next = AtomicUsize::new(0);
        let errors: Mutex<Vec<KernelError>> = Mutex::new(Vec::new());
        let bytes = &entry.map[..];
        let register = || {
            if let Err(e) = self.ctx.bind_to_thread() {
                errors
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(KernelError::Driver {
                        op: "cuCtxSetCurrent",
                        source: e,
                    });
                return;
            }
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count || !errors.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                    return;
                }
                let start = i as u64 * piece;
                let len = piece.min(key.size - start);
                match register_range(&bytes[start as usize..(start + len) as usize]) {
                    Ok(device_ptr) => {
                        slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(Piece { start, len, device_ptr })
                    }
                    Err(e) => errors.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                }
            }
        };
        let threads = o.register_threads.min(count).max(1);
        std::thread::scope(|s| {
            for _ in 1..threads {
                s.spawn(register);
            }
            register();
        });
        entry.pieces = slots
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .flatten()
            .collect();
        if let Some(e) = errors
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_iter()
            .next()
        {
            // Nothing was copied from the pieces registered so far.
            for p in entry.pieces.drain(..) {
                let ptr = entry.map[p.start as usize..].as_ptr() as *mut std::ffi::c_void;
                // SAFETY: registered by `register_range` above; no copy used it.
                let _ = unsafe { sys::cuMemHostUnregister(ptr) };
            }
            return Err(e);
        }
        entry.pieces.sort_by_key(|p| p.start);
        Ok(())
    }
}

/// Page-locks `range` (read-only, device-mapped) and returns the device's
/// address of its first byte. The caller has bound the context.
pub(crate) fn register_range(range: &[u8]) -> Result<u64, KernelError> {
    let ptr = range.as_ptr() as *mut std::ffi::c_void;
    // SAFETY: `range` is a live read-only mapping that starts on a page
    // (the mapping is page-aligned and pieces are multiples of
    // REGISTER_PIECE_MIN); READ_ONLY tells the driver the device only reads
    // it. The owning `Entry` unregisters it before the mapping is dropped.
    unsafe {
        sys::cuMemHostRegister_v2(
            ptr,
            range.len(),
            sys::CU_MEMHOSTREGISTER_READ_ONLY | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
        )
    }
    .result()
    .map_err(KernelError::driver("cuMemHostRegister (resident blob)"))?;
    let mut device_ptr: sys::CUdeviceptr = 0;
    // SAFETY: `ptr` was registered with DEVICEMAP just above; the call
    // writes one device pointer.
    let got = unsafe { sys::cuMemHostGetDevicePointer_v2(&mut device_ptr, ptr, 0) }
        .result()
        .map_err(KernelError::driver("cuMemHostGetDevicePointer (resident blob)"));
    if let Err(e) = got {
        // SAFETY: registered just above, never used by a copy.
        let _ = unsafe { sys::cuMemHostUnregister(ptr) };
        return Err(e);
    }
    Ok(device_ptr)
}

impl Drop for ResidentCache {
    fn drop(&mut self) {
        // Unregister before the mappings go; an error here leaves pages
        // pinned until the process exits, which is all that can be done.
        let _ = self.evict_to(0, 0);
        while let Some(e) = self.entries.pop() {
            let _ = self.release(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_options_are_checked_without_a_gpu() {
        ResidentOptions::default().check().unwrap();
        let zero_threads = ResidentOptions {
            register_threads: 0,
            ..Default::default()
        };
        assert!(zero_threads
            .check()
            .unwrap_err()
            .to_string()
            .contains("register threads 0"));
        let odd_piece = ResidentOptions {
            piece_bytes: 3 << 20,
            ..Default::default()
        };
        assert!(odd_piece.check().unwrap_err().to_string().contains("not a multiple"));
        let whole = ResidentOptions {
            piece_bytes: 0,
            ..Default::default()
        };
        whole.check().unwrap();
    }
}
