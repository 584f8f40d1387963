//! Owned page-locked host memory and device memory, with the raw pointers the
//! streamer hands to asynchronous copies. Both free their memory on drop; the
//! owner must have synchronised every stream that still reads them.

use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext};

use crate::KernelError;

/// Page-locked host memory from `cuMemHostAlloc`, allocated once and reused.
///
/// Write-combined memory skips the CPU caches: host writes stream to memory
/// and the DMA engine reads it without snooping, but host reads of it are
/// uncached and an order of magnitude slower. Whether it pays is measured by
/// `cnse-dp gpu bench` (docs/GPU.md has the numbers).
pub struct PinnedBuffer {
    ctx: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
    write_combined: bool,
}

// SAFETY: the buffer exclusively owns its allocation; shared access only
// reads through `&self`, mutation needs `&mut self`, exactly like a Vec<u8>.
unsafe impl Send for PinnedBuffer {}
// SAFETY: see `Send`; no interior mutability.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    pub fn new(ctx: &Arc<CudaContext>, len: usize, write_combined: bool) -> Result<Self, KernelError> {
        assert!(len > 0, "pinned buffers are never empty");
        ctx.bind_to_thread().map_err(KernelError::driver("cuCtxSetCurrent"))?;
        // DEVICEMAP: kernels may read the buffer in place (the streamer's
        // copy kernel); under unified addressing this costs nothing.
        let wc = if write_combined {
            sys::CU_MEMHOSTALLOC_WRITECOMBINED
        } else {
            0
        };
        let flags = sys::CU_MEMHOSTALLOC_DEVICEMAP | wc;
        // SAFETY: the context is current on this thread; the returned pointer
        // is owned by this struct until `Drop` frees it.
        let ptr = unsafe { result::malloc_host(len, flags) }.map_err(KernelError::driver("cuMemHostAlloc"))?;
        // Touch every page once so that first-use faults do not land inside a
        // timed load (the driver pins the pages but may map them lazily).
        // SAFETY: `ptr` points to `len` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, len) };
        Ok(Self {
            ctx: ctx.clone(),
            ptr: ptr as *mut u8,
            len,
            write_combined,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn write_combined(&self) -> bool {
        self.write_combined
    }

    /// The device's address of this buffer, for kernels that read it.
    pub fn device_ptr(&self) -> Result<sys::CUdeviceptr, KernelError> {
        self.ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a live cuMemHostAlloc allocation made with
        // DEVICEMAP; `dptr` is a valid out-pointer.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, self.ptr as *mut std::ffi::c_void, 0) }
            .result()
            .map_err(KernelError::driver("cuMemHostGetDevicePointer"))?;
        Ok(dptr)
    }

    /// The host address, for memory a device copy writes asynchronously:
    /// read it (volatile) only after that copy has completed.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes for the lifetime of `self`
        // and was initialised in `new`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `ptr` came from `cuMemHostAlloc` and is freed once; owners
        // synchronise the streams that read it before dropping it.
        let _ = unsafe { result::free_host(self.ptr as *mut std::ffi::c_void) };
    }
}

/// Device memory from `cuMemAlloc`, freed on drop.
pub struct DeviceBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

// SAFETY: a device address is a plain integer; the allocation is owned.
unsafe impl Send for DeviceBuffer {}
// SAFETY: `&self` methods only read device memory with synchronous copies.
unsafe impl Sync for DeviceBuffer {}

impl DeviceBuffer {
    pub fn new(ctx: &Arc<CudaContext>, len: usize) -> Result<Self, KernelError> {
        ctx.bind_to_thread().map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let ptr = if len == 0 {
            0
        } else {
            // SAFETY: the context is current; the allocation is owned here.
            unsafe { result::malloc_sync(len) }.map_err(KernelError::driver("cuMemAlloc"))?
        };
        Ok(Self {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Raw device address, for asynchronous copies the caller synchronises.
    pub fn device_ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }

    fn check_range(&self, op: &'static str, offset: usize, len: usize) -> Result<(), KernelError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(KernelError::Shape {
                op,
                detail: format!("{offset}+{len} past {} bytes", self.len),
            }),
        }
    }

    /// Synchronous copy of device bytes `offset..offset + out.len()` to host.
    pub fn copy_to_host(&self, offset: usize, out: &mut [u8]) -> Result<(), KernelError> {
        self.check_range("copy_to_host", offset, out.len())?;
        if out.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        // SAFETY: the range is inside the allocation (checked above) and the
        // copy completes before returning.
        unsafe { result::memcpy_dtoh_sync(out, self.ptr + offset as u64) }.map_err(KernelError::driver("cuMemcpyDtoH"))
    }

    /// Synchronous copy from any host memory (the pageable path users take
    /// today: `read` the file, then copy).
    pub fn copy_from_host(&mut self, offset: usize, src: &[u8]) -> Result<(), KernelError> {
        self.check_range("copy_from_host", offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        // SAFETY: the range is inside the allocation (checked above) and the
        // copy completes before returning.
        unsafe { result::memcpy_htod_sync(self.ptr + offset as u64, src) }.map_err(KernelError::driver("cuMemcpyHtoD"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: `ptr` came from `cuMemAlloc` and is freed once; owners
            // synchronise the streams that write it before dropping it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}
