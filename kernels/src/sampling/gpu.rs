//! The sampling kernels on the GPU: `cuda/sampling.cu`, compiled by NVRTC
//! once per process and architecture, launched on one stream with buffers
//! allocated up front for `max_batch` rows.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::Ptx;

use super::{RowParams, SampleRow, SamplerConfig, TokenSampler};
use crate::KernelError;

/// The CUDA source, embedded so that the binary carries its kernels.
pub const SAMPLING_CU: &str = include_str!("../../cuda/sampling.cu");
/// Threads per block of the per-row kernels (NT in the source).
const ROW_THREADS: u32 = 1024;
/// Threads per block of `synth_logits`.
const SYNTH_THREADS: u32 = 256;

// SAFETY: RowParams is #[repr(C)], 32 bytes of plain numbers with the same
// layout as `struct RowParams` in sampling.cu.
unsafe impl DeviceRepr for RowParams {}
// SAFETY: all-zero bits are a valid RowParams (every field is a number).
unsafe impl ValidAsZeroBits for RowParams {}

/// PTX of sampling.cu for one architecture, compiled once per process.
fn ptx_for(arch: String) -> Result<Ptx, KernelError> {
    crate::device::compile("sampling.cu", SAMPLING_CU, arch)
}

struct Functions {
    synth: CudaFunction,
    sample: CudaFunction,
    argmax: CudaFunction,
    softmax: CudaFunction,
    top_k: CudaFunction,
    top_p: CudaFunction,
}

/// Device state shared by `LogitKernels` and `BatchSampler`.
struct Core {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    f: Functions,
    vocab: u32,
    max_batch: usize,
    logits: CudaSlice<f32>,
    probs: Option<CudaSlice<f32>>,
    params: CudaSlice<RowParams>,
    ids: CudaSlice<u32>,
    host_params: PinnedHostSlice<RowParams>,
    host_ids: PinnedHostSlice<u32>,
}

impl Core {
    fn new(ordinal: usize, config: SamplerConfig) -> Result<Self, KernelError> {
        config.check()?;
        let ctx = crate::device::open(ordinal)?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(KernelError::driver("compute capability"))?;
        let ptx = ptx_for(format!("compute_{major}{minor}"))?;
        let module = ctx.load_module(ptx).map_err(KernelError::driver("cuModuleLoadData"))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(KernelError::driver("cuModuleGetFunction"))
        };
        let f = Functions {
            synth: load("synth_logits")?,
            sample: load("sample_rows")?,
            argmax: load("argmax_rows")?,
            softmax: load("softmax_rows")?,
            top_k: load("top_k_filter_rows")?,
            top_p: load("top_p_filter_rows")?,
        };
        let stream = ctx.new_stream().map_err(KernelError::driver("cuStreamCreate"))?;
        let vocab = config.vocab;
        let rows = config.max_batch;
        let alloc = KernelError::driver("cuMemAlloc");
        let logits = stream.alloc_zeros::<f32>(rows * vocab as usize).map_err(alloc)?;
        let params = stream
            .alloc_zeros::<RowParams>(rows)
            .map_err(KernelError::driver("cuMemAlloc"))?;
        let ids = stream
            .alloc_zeros::<u32>(rows)
            .map_err(KernelError::driver("cuMemAlloc"))?;
        // SAFETY: both host buffers are written (params) or filled by a
        // device copy (ids) before they are read; not write-combined because
        // the host reads the ids back.
        let host_params = unsafe { ctx.alloc_pinned_with_flags::<RowParams>(rows, 0) }
            .map_err(KernelError::driver("cuMemHostAlloc"))?;
        // SAFETY: see above.
        let host_ids =
            unsafe { ctx.alloc_pinned_with_flags::<u32>(rows, 0) }.map_err(KernelError::driver("cuMemHostAlloc"))?;
        Ok(Self {
            ctx,
            stream,
            f,
            vocab,
            max_batch: rows,
            logits,
            probs: None,
            params,
            ids,
            host_params,
            host_ids,
        })
    }

    fn check_rows(&self, op: &'static str, rows: usize) -> Result<(), KernelError> {
        if rows == 0 || rows > self.max_batch {
            return Err(KernelError::Shape {
                op,
                detail: format!("{rows} rows outside 1..={}", self.max_batch),
            });
        }
        Ok(())
    }

    fn check_logits(&self, op: &'static str, logits: usize) -> Result<usize, KernelError> {
        let v = self.vocab as usize;
        if logits == 0 || logits % v != 0 {
            return Err(KernelError::Shape {
                op,
                detail: format!("{logits} logits is not a whole number of rows of {v}"),
            });
        }
        let rows = logits / v;
        self.check_rows(op, rows)?;
        Ok(rows)
    }

    /// Writes the rows' parameters into the pinned staging buffer and queues
    /// their copy. Every public call ends with a stream synchronisation, so
    /// the previous call's copy out of the staging buffer has completed.
    fn upload_params(
        &mut self,
        params: impl ExactSizeIterator<Item = Result<RowParams, KernelError>>,
    ) -> Result<usize, KernelError> {
        let n = params.len();
        self.check_rows("params", n)?;
        let host = self
            .host_params
            .as_mut_slice()
            .map_err(KernelError::driver("cuEventSynchronize"))?;
        for (dst, p) in host.iter_mut().zip(params) {
            *dst = p?;
        }
        let mut dst = self.params.slice_mut(..n);
        self.stream
            .memcpy_htod(&host[..n], &mut dst)
            .map_err(KernelError::driver("cuMemcpyHtoDAsync"))?;
        Ok(n)
    }

    fn upload_logits(&mut self, logits: &[f32]) -> Result<(), KernelError> {
        let mut dst = self.logits.slice_mut(..logits.len());
        self.stream
            .memcpy_htod(logits, &mut dst)
            .map_err(KernelError::driver("cuMemcpyHtoD"))
    }

    fn row_launch(rows: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn read_ids(&mut self, out: &mut [u32]) -> Result<(), KernelError> {
        let n = out.len();
        let src = self.ids.slice(..n);
        self.stream
            .memcpy_dtoh(&src, &mut self.host_ids)
            .map_err(KernelError::driver("cuMemcpyDtoHAsync"))?;
        self.stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))?;
        let host = self
            .host_ids
            .as_slice()
            .map_err(KernelError::driver("cuEventSynchronize"))?;
        out.copy_from_slice(&host[..n]);
        Ok(())
    }

    fn launch_sample(&mut self, rows: usize) -> Result<(), KernelError> {
        let vocab = self.vocab;
        let mut b = self.stream.launch_builder(&self.f.sample);
        b.arg(&self.logits).arg(&self.params).arg(&mut self.ids).arg(&vocab);
        // SAFETY: sample_rows(const float*, const RowParams*, u32*, u32)
        // reads rows × vocab logits and rows params, writes rows ids; all
        // three buffers hold max_batch >= rows rows.
        unsafe { b.launch(Self::row_launch(rows)) }.map_err(KernelError::driver("launch sample_rows"))?;
        Ok(())
    }

    fn launch_synth(&mut self, rows: usize) -> Result<(), KernelError> {
        let vocab = self.vocab;
        let cfg = LaunchConfig {
            grid_dim: (vocab.div_ceil(SYNTH_THREADS), rows as u32, 1),
            block_dim: (SYNTH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = self.stream.launch_builder(&self.f.synth);
        b.arg(&mut self.logits).arg(&self.params).arg(&vocab);
        // SAFETY: synth_logits(float*, const RowParams*, u32) writes
        // rows × vocab logits (grid.y = rows <= max_batch) and reads rows params.
        unsafe { b.launch(cfg) }.map_err(KernelError::driver("launch synth_logits"))?;
        Ok(())
    }
}

fn params_of(rows: &[SampleRow]) -> impl ExactSizeIterator<Item = Result<RowParams, KernelError>> + '_ {
    rows.iter().map(RowParams::from_row)
}

/// The GPU sampler of the synthetic backend: generates each row's logits
/// from (seed, position) on the device and samples one token per row, all in
/// two kernel launches per batch. Gives the same ids as `CpuSampler`.
pub struct BatchSampler {
    core: Core,
    config: SamplerConfig,
}

impl BatchSampler {
    pub fn new(ordinal: usize, config: SamplerConfig) -> Result<Self, KernelError> {
        Ok(Self {
            core: Core::new(ordinal, config)?,
            config,
        })
    }

    /// Generated logits of the last batch (rows × vocab), for tests.
    pub fn last_logits(&self, rows: usize, out: &mut [f32]) -> Result<(), KernelError> {
        let n = rows * self.config.vocab as usize;
        let src = self.core.logits.slice(..n);
        self.core
            .stream
            .memcpy_dtoh(&src, &mut out[..n])
            .map_err(KernelError::driver("cuMemcpyDtoH"))?;
        self.core
            .stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))
    }
}

impl TokenSampler for BatchSampler {
    fn config(&self) -> SamplerConfig {
        self.config
    }

    fn sample(&mut self, rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError> {
        self.config.check_call(rows, out_ids)?;
        if rows.is_empty() {
            return Ok(());
        }
        self.core
            .ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        let n = self.core.upload_params(params_of(rows))?;
        self.core.launch_synth(n)?;
        self.core.launch_sample(n)?;
        self.core.read_ids(out_ids)
    }
}

/// The individual kernels over caller-supplied logit rows (row-major,
/// `vocab` per row), each the GPU twin of the function of the same name in
/// `sampling::cpu`.
pub struct LogitKernels {
    core: Core,
}

impl LogitKernels {
    pub fn new(ordinal: usize, config: SamplerConfig) -> Result<Self, KernelError> {
        Ok(Self {
            core: Core::new(ordinal, config)?,
        })
    }

    fn rows_with(&mut self, op: &'static str, logits: &[f32], params: Vec<RowParams>) -> Result<usize, KernelError> {
        let rows = self.core.check_logits(op, logits.len())?;
        if params.len() != rows {
            return Err(KernelError::Shape {
                op,
                detail: format!("{} parameter rows for {rows} logit rows", params.len()),
            });
        }
        self.core
            .ctx
            .bind_to_thread()
            .map_err(KernelError::driver("cuCtxSetCurrent"))?;
        self.core.upload_params(params.into_iter().map(Ok))?;
        self.core.upload_logits(logits)?;
        Ok(rows)
    }

    fn download_logits(&mut self, out: &mut [f32]) -> Result<(), KernelError> {
        let src = self.core.logits.slice(..out.len());
        self.core
            .stream
            .memcpy_dtoh(&src, out)
            .map_err(KernelError::driver("cuMemcpyDtoH"))?;
        self.core
            .stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))
    }

    pub fn softmax(&mut self, logits: &[f32], temperatures: &[f32], probs: &mut [f32]) -> Result<(), KernelError> {
        let params = temperatures
            .iter()
            .map(|&t| {
                Ok(RowParams {
                    inv_temp: super::inv_temperature(t)?,
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        if probs.len() != logits.len() {
            return Err(KernelError::Shape {
                op: "softmax",
                detail: "probs and logits differ in length".into(),
            });
        }
        let rows = self.rows_with("softmax", logits, params)?;
        if self.core.probs.is_none() {
            let n = self.core.max_batch * self.core.vocab as usize;
            self.core.probs = Some(
                self.core
                    .stream
                    .alloc_zeros::<f32>(n)
                    .map_err(KernelError::driver("cuMemAlloc"))?,
            );
        }
        let vocab = self.core.vocab;
        let core = &mut self.core;
        let probs_dev = core.probs.as_mut().expect("allocated above");
        let mut b = core.stream.launch_builder(&core.f.softmax);
        b.arg(&core.logits).arg(&mut *probs_dev).arg(&core.params).arg(&vocab);
        // SAFETY: softmax_rows(const float*, float*, const RowParams*, u32)
        // touches rows × vocab floats of buffers sized max_batch × vocab.
        unsafe { b.launch(Core::row_launch(rows)) }.map_err(KernelError::driver("launch softmax_rows"))?;
        let src = probs_dev.slice(..probs.len());
        core.stream
            .memcpy_dtoh(&src, probs)
            .map_err(KernelError::driver("cuMemcpyDtoH"))?;
        core.stream
            .synchronize()
            .map_err(KernelError::driver("cuStreamSynchronize"))
    }

    pub fn top_k_filter(&mut self, logits: &mut [f32], ks: &[u32]) -> Result<(), KernelError> {
        let params = ks
            .iter()
            .map(|&k| RowParams {
                top_k: k,
                ..Default::default()
            })
            .collect();
        let rows = self.rows_with("top_k_filter", logits, params)?;
        let vocab = self.core.vocab;
        let core = &mut self.core;
        let mut b = core.stream.launch_builder(&core.f.top_k);
        b.arg(&mut core.logits).arg(&core.params).arg(&vocab);
        // SAFETY: top_k_filter_rows(float*, const RowParams*, u32) rewrites
        // rows × vocab logits in place; buffers hold max_batch rows.
        unsafe { b.launch(Core::row_launch(rows)) }.map_err(KernelError::driver("launch top_k_filter_rows"))?;
        self.download_logits(logits)
    }

    pub fn top_p_filter(
        &mut self,
        logits: &mut [f32],
        temperatures: &[f32],
        top_ps: &[f32],
    ) -> Result<(), KernelError> {
        if top_ps.len() != temperatures.len() {
            return Err(KernelError::Shape {
                op: "top_p_filter",
                detail: "one top_p per temperature".into(),
            });
        }
        let params = temperatures
            .iter()
            .zip(top_ps)
            .map(|(&t, &p)| {
                super::check_top_p(p)?;
                Ok(RowParams {
                    inv_temp: super::inv_temperature(t)?,
                    top_p: p,
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>, KernelError>>()?;
        let rows = self.rows_with("top_p_filter", logits, params)?;
        let vocab = self.core.vocab;
        let core = &mut self.core;
        let mut b = core.stream.launch_builder(&core.f.top_p);
        b.arg(&mut core.logits).arg(&core.params).arg(&vocab);
        // SAFETY: top_p_filter_rows(float*, const RowParams*, u32), as above.
        unsafe { b.launch(Core::row_launch(rows)) }.map_err(KernelError::driver("launch top_p_filter_rows"))?;
        self.download_logits(logits)
    }

    pub fn argmax(&mut self, logits: &[f32], out_ids: &mut [u32]) -> Result<(), KernelError> {
        let rows = self.core.check_logits("argmax", logits.len())?;
        if out_ids.len() != rows {
            return Err(KernelError::Shape {
                op: "argmax",
                detail: "one output id per row".into(),
            });
        }
        self.rows_with("argmax", logits, vec![RowParams::default(); rows])?;
        let vocab = self.core.vocab;
        let core = &mut self.core;
        let mut b = core.stream.launch_builder(&core.f.argmax);
        b.arg(&core.logits).arg(&mut core.ids).arg(&vocab);
        // SAFETY: argmax_rows(const float*, u32*, u32) reads rows × vocab
        // logits and writes rows ids.
        unsafe { b.launch(Core::row_launch(rows)) }.map_err(KernelError::driver("launch argmax_rows"))?;
        core.read_ids(out_ids)
    }

    /// Temperature, top-k, top-p and the seeded draw; `rows[i].seed` and
    /// `.position` choose the draw only (the logits are the caller's).
    pub fn sample(&mut self, logits: &[f32], rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError> {
        if out_ids.len() != rows.len() {
            return Err(KernelError::Shape {
                op: "sample",
                detail: "one output id per row".into(),
            });
        }
        let params = rows.iter().map(RowParams::from_row).collect::<Result<Vec<_>, _>>()?;
        let n = self.rows_with("sample", logits, params)?;
        self.core.launch_sample(n)?;
        self.core.read_ids(out_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: where the library is present, the embedded source
    /// must compile for Hopper (the device machine) and an older target.
    #[test]
    fn sampling_cu_compiles_with_nvrtc() {
        if !crate::device::nvrtc_available() {
            println!("skipped: no NVRTC library");
            return;
        }
        for arch in ["compute_90", "compute_80"] {
            let ptx = ptx_for(arch.into()).unwrap_or_else(|e| panic!("{arch}: {e}"));
            let src = ptx.to_src();
            for f in [
                "synth_logits",
                "sample_rows",
                "argmax_rows",
                "softmax_rows",
                "top_k_filter_rows",
            ] {
                assert!(src.contains(&format!(".entry {f}")), "{arch}: no entry {f}");
            }
            // --fmad=false: no fused multiply-add may appear in float code.
            assert!(!src.contains("fma.rn.f32"), "{arch}: contracted FMA in PTX");
            if let Ok(p) = std::env::var("CNSE_DUMP_PTX") {
                std::fs::write(format!("{p}.{arch}.ptx"), &src).unwrap();
            }
        }
    }
}

#[cfg(test)]
mod send_tests {
    /// The synthetic backend builds one sampler per core and may move it
    /// into that core's thread.
    #[test]
    fn samplers_and_streamer_are_send() {
        fn send<T: Send>() {}
        send::<super::BatchSampler>();
        send::<super::LogitKernels>();
        send::<crate::CpuSampler>();
        send::<crate::Streamer>();
    }
}
