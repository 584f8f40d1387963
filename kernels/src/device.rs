//! Finding the driver and the devices, without ever panicking when CUDA is
//! missing: cudarc panics on the first call into an absent library, so every
//! path checks `cuda_available()` (and `nvrtc_available()`) first.

use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::sys::CUdevice_attribute as Attr;
use cudarc::driver::CudaContext;
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::KernelError;

/// Whether libcuda can be loaded on this machine (probed once).
pub fn cuda_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the library names and
    // drops the handles; it runs no code of the library beyond its loader.
    *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() })
}

/// Whether libnvrtc can be loaded on this machine (probed once).
pub fn nvrtc_available() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: as in `cuda_available`, a dlopen probe only.
    *PRESENT.get_or_init(|| unsafe { cudarc::nvrtc::sys::is_culib_present() })
}

/// For tests that need a GPU: true when a driver is present. Without one it
/// prints `skipped: no CUDA driver` and returns false, unless
/// `CNSE_REQUIRE_GPU=1` (set on the device machine), when it panics so that
/// a missing driver fails the run instead of passing it.
pub fn gpu_or_skip() -> bool {
    or_skip(
        cuda_available(),
        "no CUDA driver",
        "no CUDA driver found (libcuda.so could not be loaded)",
    )
}

/// For tests: true when `ok`; else prints `skipped: {why}` and returns
/// false, or panics with `{detail}` under `CNSE_REQUIRE_GPU=1` (the device
/// machine), so that a missing capability fails the run there.
pub fn or_skip(ok: bool, why: &str, detail: &str) -> bool {
    if ok {
        return true;
    }
    assert!(
        std::env::var("CNSE_REQUIRE_GPU").as_deref() != Ok("1"),
        "CNSE_REQUIRE_GPU=1 but {detail}"
    );
    println!("skipped: {why}");
    false
}

pub(crate) fn require_driver() -> Result<(), KernelError> {
    if cuda_available() {
        Ok(())
    } else {
        Err(KernelError::NoDriver)
    }
}

/// Number of CUDA devices; `NoDriver` without a driver.
pub fn device_count() -> Result<usize, KernelError> {
    require_driver()?;
    let n = CudaContext::device_count().map_err(KernelError::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// The primary context of device `ordinal`, after checking that it exists.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>, KernelError> {
    let count = device_count()?;
    if ordinal >= count {
        return Err(KernelError::NoDevice { ordinal, count });
    }
    CudaContext::new(ordinal).map_err(KernelError::driver("cuDevicePrimaryCtxRetain"))
}

/// PTX of an embedded CUDA source for one virtual architecture, compiled by
/// NVRTC once per process. `--fmad=false`: no multiply-add is contracted into
/// an FMA, so float results match the CPU references bit for bit.
pub(crate) fn compile(file: &'static str, src: &'static str, arch: String) -> Result<Ptx, KernelError> {
    type Cache = Mutex<Vec<(&'static str, String, Ptx)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, ptx)) = cache.iter().find(|(f, a, _)| *f == file && *a == arch) {
        return Ok(ptx.clone());
    }
    if !nvrtc_available() {
        return Err(KernelError::NoNvrtc);
    }
    let opts = CompileOptions {
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(file.into()),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| KernelError::Compile {
        file,
        detail: e.to_string(),
    })?;
    cache.push((file, arch, ptx.clone()));
    Ok(ptx)
}

/// The virtual architecture to compile for on `ctx`'s device.
pub(crate) fn arch_of(ctx: &CudaContext) -> Result<String, KernelError> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(KernelError::driver("compute capability"))?;
    Ok(format!("compute_{major}{minor}"))
}

/// What `cnse-dp gpu info` prints about one device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
    pub multiprocessors: i32,
    pub l2_bytes: i32,
    pub copy_engines: i32,
    pub pci: String,
    pub memory_bus_bits: i32,
}

/// Driver version as (major, minor).
pub fn driver_version() -> Result<(i32, i32), KernelError> {
    require_driver()?;
    let mut v = 0i32;
    // SAFETY: the driver library is present (checked above) and `v` is a
    // valid out-pointer for the duration of the call.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(KernelError::driver("cuDriverGetVersion"))?;
    Ok((v / 1000, (v % 1000) / 10))
}

/// NVRTC version as (major, minor), or `NoNvrtc`.
pub fn nvrtc_version() -> Result<(i32, i32), KernelError> {
    if !nvrtc_available() {
        return Err(KernelError::NoNvrtc);
    }
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: the library is present (checked above); both out-pointers are
    // valid for the call.
    let rc = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if rc != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(KernelError::Compile {
            file: "nvrtcVersion",
            detail: format!("{rc:?}"),
        });
    }
    Ok((major, minor))
}

/// Properties of every device.
pub fn devices() -> Result<Vec<DeviceInfo>, KernelError> {
    let count = device_count()?;
    let mut out = Vec::with_capacity(count);
    for ordinal in 0..count {
        let ctx = open(ordinal)?;
        let attr = |a: Attr| ctx.attribute(a).map_err(KernelError::driver("cuDeviceGetAttribute"));
        let (free_bytes, total_bytes) = ctx.mem_get_info().map_err(KernelError::driver("cuMemGetInfo"))?;
        out.push(DeviceInfo {
            ordinal,
            name: ctx.name().map_err(KernelError::driver("cuDeviceGetName"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(KernelError::driver("compute capability"))?,
            total_bytes,
            free_bytes,
            multiprocessors: attr(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            l2_bytes: attr(Attr::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)?,
            copy_engines: attr(Attr::CU_DEVICE_ATTRIBUTE_ASYNC_ENGINE_COUNT)?,
            pci: format!(
                "{:04x}:{:02x}:{:02x}",
                attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
                attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?
            ),
            memory_bus_bits: attr(Attr::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH)?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_every_entry_point_says_so() {
        if cuda_available() {
            println!("skipped: a CUDA driver is present on this machine");
            return;
        }
        for err in [
            device_count().err(),
            open(0).err(),
            devices().err(),
            driver_version().err(),
        ] {
            let msg = err.expect("must fail without a driver").to_string();
            assert!(msg.contains("no CUDA driver found"), "{msg}");
        }
    }
}
