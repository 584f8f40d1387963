//! SHA-256 on the GPU: `cuda/sha256.cu` hashes the fixed-size leaves of a
//! device buffer, one thread per leaf, and compares them with expected
//! digests on the device. The leaf layout is the store's (`cnse-store`
//! `leaves.rs`): leaf `i` is bytes `i * leaf_bytes ..`, the last one may be
//! short.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::pinned::DeviceBuffer;
use crate::KernelError;

/// The kernel's source, embedded.
pub const SHA256_CU: &str = include_str!("../cuda/sha256.cu");
/// Threads per block: few, so that a launch of a few thousand leaves still
/// spreads over every SM.
const LEAF_THREADS: u32 = 64;
/// Leaves per launch at most (the kernel indexes them with 32 bits).
pub const LEAVES_PER_LAUNCH_MAX: u64 = 1 << 30;

/// One launch of `sha256_leaves`: leaves `first .. first + count` of the
/// blob of `size` bytes at device address `data`. Digest `t` of the launch
/// (leaf `first + t`) is written to `out + 32 t` unless `out` is 0, and
/// compared with `expect + 32 t` unless `expect` is 0.
#[derive(Clone, Copy, Debug)]
pub struct LeafLaunch {
    pub data: u64,
    pub size: u64,
    pub leaf_bytes: u32,
    pub first: u64,
    pub count: u64,
    pub expect: u64,
    pub out: u64,
}

/// Where a leaf check failed: the first bad leaf and how many were bad.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafMismatch {
    pub first_leaf: u64,
    pub bad_leaves: u32,
}

impl LeafMismatch {
    /// Reads the kernel's mismatch words (see [`LeafHasher::queue_report`]).
    pub fn from_words(words: &[u8; 16]) -> Option<Self> {
        let first_leaf = u64::from_le_bytes(words[..8].try_into().expect("8 bytes"));
        let bad_leaves = u32::from_le_bytes(words[8..12].try_into().expect("4 bytes"));
        (bad_leaves > 0).then_some(LeafMismatch { first_leaf, bad_leaves })
    }
}

/// The compiled kernel, its stream, and the device words the kernel reports
/// mismatches in (`first_bad: u64`, `bad_count: u32`).
pub struct LeafHasher {
    ctx: Arc<CudaContext>,
    func: CudaFunction,
    stream: Arc<CudaStream>,
    result: DeviceBuffer,
}

impl LeafHasher {
    /// Compiles `sha256.cu` (once per process) and creates the hash stream.
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, KernelError> {
        let ptx = crate::device::compile("sha256.cu", SHA256_CU, crate::device::arch_of(ctx)?)?;
        let module = ctx.load_module(ptx).map_err(KernelError::driver("cuModuleLoadData"))?;
        let func = module
            .load_function("sha256_leaves")
            .map_err(KernelError::driver("cuModuleGetFunction"))?;
        // The greatest priority the context allows: when a window's leaves
        // are due, their blocks are scheduled before the copy kernels'
        // pending blocks, so verdicts (and the last window, the load's
        // tail) are not queued behind copies.
        ctx.bind_to_thread().map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let (_, greatest) = cudarc::driver::result::stream::get_priority_range()
            .map_err(KernelError::driver("cuCtxGetStreamPriorityRange"))?;
        let stream = ctx
            .new_stream_with_priority(greatest)
            .map_err(KernelError::driver("cuStreamCreateWithPriority"))?;
        let result = DeviceBuffer::new(ctx, 16)?;
        let h = Self {
            ctx: ctx.clone(),
            func,
            stream,
            result,
        };
        // One launch now, so the module's first-use costs (lazy loading)
        // are paid here and not by the first window of the first load.
        let mut probe = DeviceBuffer::new(ctx, 64)?;
        probe.copy_from_host(0, &[0u8; 64])?;
        h.leaf_digests(&probe, 64, 64)?;
        h.reset()?;
        Ok(h)
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream every launch goes to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Clears the mismatch report (waits for queued launches first).
    pub fn reset(&self) -> Result<(), KernelError> {
        self.sync()?;
        let mut words = [0u8; 16];
        words[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        // SAFETY: `result` is 16 bytes of device memory owned by `self`; the
        // copy is synchronous and nothing else writes it (stream idle).
        unsafe { cudarc::driver::result::memcpy_htod_sync(self.result.device_ptr(), &words[..]) }
            .map_err(KernelError::driver("cuMemcpyHtoD"))
    }

    /// Waits for every launch queued so far.
    pub fn sync(&self) -> Result<(), KernelError> {
        self.stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))
    }

    /// Queues one [`LeafLaunch`] on the hash stream.
    ///
    /// # Safety
    ///
    /// `data .. data + size` must be device memory of this context that
    /// stays allocated, and is not written, until the launch completes (the
    /// caller orders writes before it with events on the hash stream and
    /// synchronises before freeing); `out` and `expect`, when not 0, must
    /// hold `32 * count` bytes under the same rule.
    pub unsafe fn queue(&self, l: &LeafLaunch) -> Result<(), KernelError> {
        let LeafLaunch {
            data,
            size,
            leaf_bytes,
            first,
            count,
            expect,
            out,
        } = *l;
        if leaf_bytes == 0 || leaf_bytes % 64 != 0 || count > LEAVES_PER_LAUNCH_MAX {
            return Err(KernelError::Shape {
                op: "sha256_leaves",
                detail: format!("leaf_bytes {leaf_bytes} (multiple of 64) and {count} leaves per launch"),
            });
        }
        if count == 0 {
            return Ok(());
        }
        let count32 = count as u32;
        let cfg = LaunchConfig {
            grid_dim: (count32.div_ceil(LEAF_THREADS), 1, 1),
            block_dim: (LEAF_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let first_bad = self.result.device_ptr();
        let bad_count = first_bad + 8;
        let mut b = self.stream.launch_builder(&self.func);
        b.arg(&data)
            .arg(&size)
            .arg(&first)
            .arg(&count32)
            .arg(&leaf_bytes)
            .arg(&expect)
            .arg(&out)
            .arg(&first_bad)
            .arg(&bad_count);
        // SAFETY: the argument list matches sha256_leaves's signature; the
        // memory it reads and writes is live per this function's contract,
        // and `result` is owned by `self`.
        unsafe { b.launch(cfg) }
            .map(|_| ())
            .map_err(KernelError::driver("launch sha256_leaves"))
    }

    /// Queues on the hash stream, behind every launch queued so far, a copy
    /// of the mismatch words (`first_bad: u64`, `bad_count: u32`, 4 bytes
    /// of padding) into `dst`, so the host can learn of a mismatch without
    /// waiting for the stream: record an event after this and read `dst`
    /// once the event has completed ([`LeafMismatch::from_words`]).
    ///
    /// # Safety
    ///
    /// `dst` must point to 16 bytes of page-locked host memory of this
    /// context that stay allocated, and that nothing reads or writes, until
    /// the copy has completed.
    pub unsafe fn queue_report(&self, dst: *mut u8) -> Result<(), KernelError> {
        // SAFETY: the caller guarantees `dst` is 16 bytes of pinned memory
        // left alone until the copy completes; `result` is 16 bytes of
        // device memory owned by `self`.
        unsafe {
            let dst = std::slice::from_raw_parts_mut(dst, 16);
            cudarc::driver::result::memcpy_dtoh_async(dst, self.result.device_ptr(), self.stream.cu_stream())
        }
        .map_err(KernelError::driver("cuMemcpyDtoHAsync"))
    }

    /// Waits for the queued launches and reports the first mismatch, if any.
    pub fn outcome(&self) -> Result<Option<LeafMismatch>, KernelError> {
        self.sync()?;
        let mut words = [0u8; 16];
        self.result.copy_to_host(0, &mut words)?;
        Ok(LeafMismatch::from_words(&words))
    }

    /// Digests of every leaf of the first `size` bytes of `buf` (tests and
    /// benchmarks): `size.div_ceil(leaf_bytes)` digests, or one, the digest
    /// of the empty message, for `size` 0.
    pub fn leaf_digests(&self, buf: &DeviceBuffer, size: u64, leaf_bytes: u32) -> Result<Vec<[u8; 32]>, KernelError> {
        if size > buf.len() as u64 {
            return Err(KernelError::Shape {
                op: "leaf_digests",
                detail: format!("{size} bytes asked of a {}-byte buffer", buf.len()),
            });
        }
        let count = size.div_ceil(leaf_bytes.max(1) as u64).max(1);
        let out = DeviceBuffer::new(&self.ctx, (count * 32) as usize)?;
        let launch = LeafLaunch {
            data: buf.device_ptr(),
            size,
            leaf_bytes,
            first: 0,
            count,
            expect: 0,
            out: out.device_ptr(),
        };
        // SAFETY: `buf` holds `size` bytes and `out` `32 * count`; both live
        // past the `sync` below, and nothing else writes them meanwhile.
        unsafe { self.queue(&launch) }?;
        self.sync()?;
        let mut host = vec![0u8; (count * 32) as usize];
        out.copy_to_host(0, &mut host)?;
        Ok(host.chunks_exact(32).map(|c| c.try_into().expect("32 bytes")).collect())
    }

    /// SHA-256 of the first `size` bytes of `buf` as one message (tests).
    pub fn digest(&self, buf: &DeviceBuffer, size: u64) -> Result<[u8; 32], KernelError> {
        let leaf = size.div_ceil(64).max(1) * 64;
        let leaf = u32::try_from(leaf).map_err(|_| KernelError::Shape {
            op: "digest",
            detail: format!("{size} bytes is more than one leaf can hold"),
        })?;
        Ok(self.leaf_digests(buf, size, leaf)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_cu_compiles_with_nvrtc() {
        if !crate::device::nvrtc_available() {
            eprintln!("skipped: no NVRTC library");
            assert!(
                std::env::var("CNSE_REQUIRE_GPU").as_deref() != Ok("1"),
                "CNSE_REQUIRE_GPU=1 but no NVRTC"
            );
            return;
        }
        crate::device::compile("sha256.cu", SHA256_CU, "compute_90".into()).expect("sha256.cu compiles");
    }
}
