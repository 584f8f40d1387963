//! What a load is asked to do and what it reports: the blob, the source and
//! mover choices, the streamer's configuration, load options and results.

use super::*;

/// What the streamer needs to know about a blob: where it is and what the
/// manifest says its chunks hash to.
#[derive(Clone, Copy, Debug)]
pub struct BlobSpec<'a> {
    pub path: &'a Path,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    /// Digest of each chunk, in order; the last chunk may be short.
    pub chunk_digests: &'a [[u8; 32]],
    /// How the chunk digests are defined: plain SHA-256 of the chunk, or
    /// the Merkle root over its leaves (format 3, `cnse_store::merkle`).
    pub scheme: cnse_store::ChunkScheme,
    /// The manifest's whole-blob SHA-256, returned once every chunk matched.
    pub digest: [u8; 32],
}

impl BlobSpec<'_> {
    pub(crate) fn check(&self) -> Result<(), KernelError> {
        let bad = |detail: String| {
            Err(KernelError::Spec {
                path: self.path.to_path_buf(),
                detail,
            })
        };
        if self.chunk_bytes == 0 {
            return bad("chunk_bytes is 0".into());
        }
        if let cnse_store::ChunkScheme::Merkle { leaf_bytes } = self.scheme {
            if leaf_bytes == 0 || self.chunk_bytes % leaf_bytes != 0 {
                return bad(format!(
                    "leaf size {leaf_bytes} does not divide the chunk size {}",
                    self.chunk_bytes
                ));
            }
        }
        let chunks = self.size_bytes.div_ceil(self.chunk_bytes);
        if chunks != self.chunk_digests.len() as u64 {
            return bad(format!(
                "{} bytes in chunks of {} need {chunks} chunk digests, manifest has {}",
                self.size_bytes,
                self.chunk_bytes,
                self.chunk_digests.len()
            ));
        }
        Ok(())
    }

    pub(crate) fn chunk_range(&self, chunk: usize) -> (u64, u64) {
        let start = chunk as u64 * self.chunk_bytes;
        (start, (start + self.chunk_bytes).min(self.size_bytes))
    }
}

/// How workers read the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceMode {
    /// memmap2 mapping; workers hash and copy from the page cache into the
    /// pinned slots, and the copy engine reads the slots.
    Mmap,
    /// `pread` into the pinned slot, then hash from there (non-write-combined
    /// slots only: reading write-combined memory is uncached).
    Pread,
    /// memmap2 mapping whose page-cache pages are page-locked piece by piece
    /// (`cuMemHostRegister`, read-only) so that the copy engine reads them in
    /// place: no host copy at all, and the CPU only hashes. Needs chunk
    /// sizes that are whole pages and a device that supports read-only
    /// registration (`Streamer::supports_register`).
    Register,
    /// Like `Register`, but the registered mapping is kept across loads in
    /// the streamer's bounded cache of resident blobs
    /// (`Streamer::set_resident`): the first load registers the blob, later
    /// loads only queue DMA. Host verification is not offered: verify on
    /// the GPU (`GpuVerifier`).
    Resident,
}

impl std::fmt::Display for SourceMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SourceMode::Mmap => "mmap",
            SourceMode::Pread => "pread",
            SourceMode::Register => "register",
            SourceMode::Resident => "resident",
        })
    }
}

/// What moves staged bytes to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mover {
    /// `cuMemcpyHtoDAsync` on the worker's stream: a copy engine.
    CopyEngine,
    /// `cuda/copy.cu`: SM threads read the device-mapped slot over PCIe and
    /// write device memory (falls back to a copy engine for device offsets
    /// that are not 16-byte aligned).
    Kernel,
    /// Synchronous `cuMemcpyHtoD` from the worker thread: one copy in
    /// flight per worker, overlap only across workers (measurement only).
    Sync,
}

impl std::fmt::Display for Mover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mover::CopyEngine => "copy engine",
            Mover::Kernel => "copy kernel",
            Mover::Sync => "sync copies",
        })
    }
}

/// The copy kernel's source, embedded.
pub const COPY_CU: &str = include_str!("../../cuda/copy.cu");

/// Shape of the staging pool, fixed when the streamer is created.
#[derive(Clone, Copy, Debug)]
pub struct StreamerConfig {
    pub threads: usize,
    pub slot_bytes: usize,
    /// Copies in flight per worker: 2 is double buffering.
    pub slots_per_thread: usize,
    /// CUDA streams the workers share round-robin (at most `threads`).
    pub streams: usize,
    pub write_combined: bool,
    /// Size of each memcpy into a slot when not verifying. Small granules
    /// use ordinary stores whose lines can still sit in the last-level cache
    /// when the copy engine reads them; one memcpy of a whole slot switches
    /// to non-temporal stores that go to DRAM. Measured in docs/GPU.md.
    pub copy_granule_bytes: usize,
    pub mover: Mover,
}

impl Default for StreamerConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Chosen by the staging sweep of `cnse-dp gpu bench` on the device
        // machine (docs/GPU.md): 2 MiB slots keep 16 x 3 slots (96 MiB)
        // inside the 300 MiB last-level cache, so the device reads what the
        // workers just wrote from cache; the copy kernel with 8 streams
        // moved 48.8 GB/s where the copy engines moved 44.4.
        Self {
            threads: cores.clamp(1, 16),
            slot_bytes: 2 << 20,
            slots_per_thread: 3,
            streams: 8,
            write_combined: false,
            copy_granule_bytes: SUB_BYTES,
            mover: Mover::Kernel,
        }
    }
}

impl StreamerConfig {
    pub(crate) fn check(&self) -> Result<(), KernelError> {
        let bad = |detail: String| {
            Err(KernelError::Shape {
                op: "streamer config",
                detail,
            })
        };
        if self.threads == 0 || self.threads > THREADS_MAX {
            return bad(format!("threads {} outside 1..={THREADS_MAX}", self.threads));
        }
        if self.slot_bytes < SUB_BYTES || self.slot_bytes > SLOT_BYTES_MAX || self.slot_bytes % SUB_BYTES != 0 {
            return bad(format!(
                "slot_bytes {} must be a multiple of {SUB_BYTES} up to {SLOT_BYTES_MAX}",
                self.slot_bytes
            ));
        }
        if self.streams == 0 {
            return bad("streams must be at least 1".into());
        }
        if self.slots_per_thread < 2 || self.slots_per_thread > 8 {
            return bad(format!("slots_per_thread {} outside 2..=8", self.slots_per_thread));
        }
        if self.copy_granule_bytes < 4096 || self.copy_granule_bytes > self.slot_bytes {
            return bad(format!(
                "copy_granule_bytes {} outside 4096..=slot_bytes",
                self.copy_granule_bytes
            ));
        }
        let pool = self.threads * self.slots_per_thread * self.slot_bytes;
        if pool > POOL_BYTES_MAX {
            return bad(format!("pool of {pool} bytes exceeds {POOL_BYTES_MAX}"));
        }
        Ok(())
    }

    pub fn pool_bytes(&self) -> usize {
        self.threads * self.slots_per_thread * self.slot_bytes
    }
}

/// Which stages run; everything but `Full` exists to measure one stage
/// alone (`cnse-dp gpu bench`), and leaves the device buffer incomplete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipeline {
    Full,
    /// Read (and hash) into staging or register pages, but queue no DMA.
    HostOnly,
    /// Queue the DMA of every piece from the staging slots without filling
    /// them (copy engine alone, with this load's piece and stream pattern).
    DmaOnly,
}

/// Per-load choices.
#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// false only for measurement (`--no-verify`).
    pub verify: bool,
    pub source: SourceMode,
    /// Workers used for this load, at most the streamer's `threads`.
    pub threads: usize,
    pub pipeline: Pipeline,
}

impl LoadOptions {
    pub fn new(verify: bool, source: SourceMode, threads: usize) -> Self {
        Self {
            verify,
            source,
            threads,
            pipeline: Pipeline::Full,
        }
    }
}

/// Seconds spent in each phase of one load.
#[derive(Clone, Copy, Debug)]
pub struct LoadReport {
    pub bytes: u64,
    pub threads: usize,
    pub source: SourceMode,
    pub mover: Mover,
    pub verified: bool,
    pub open_s: f64,
    /// Registering the blob (resident loads that admitted it; else 0),
    /// inside `open_s`.
    pub register_s: f64,
    pub device_alloc_s: f64,
    /// Hashing, host copies and DMA, overlapped, until the last copy landed.
    pub stream_s: f64,
    pub total_s: f64,
}

impl LoadReport {
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.total_s / 1e9
    }
}

/// A blob in device memory; `verified` tells whether every chunk matched.
pub struct DeviceBlob {
    pub buffer: DeviceBuffer,
    pub digest: [u8; 32],
    pub size_bytes: u64,
    pub verified: bool,
}
