//! Token choice for the synthetic backend by real sampling: each token is
//! drawn from a generated logit row with temperature softmax, top-k, top-p
//! and a seeded draw, on the GPU (`cuda[:N]`, the kernels of cnse-kernels,
//! one batch per loop turn across all streams) or with the CPU reference
//! (`cpu-sampler`, the same token ids, for side-by-side measurement).

use cnse_backend::synthetic::{PickRow, Picker, PickerFactory};
use cnse_kernels::{BatchSampler, CpuSampler, SampleRow, SamplerConfig, TokenSampler};

/// Where the synthetic backend picks its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyntheticDevice {
    /// Counter-based hash, no sampling (the default; fastest).
    Hash,
    /// The CPU reference sampler.
    CpuSampler,
    /// The GPU sampler on device N.
    Cuda(usize),
}

impl std::str::FromStr for SyntheticDevice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" | "hash" => Ok(Self::Hash),
            "cpu-sampler" => Ok(Self::CpuSampler),
            "cuda" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown synthetic device {s:?} (cpu, cpu-sampler, cuda, cuda:N)"
                )),
            },
        }
    }
}

pub struct SamplerPickerFactory {
    pub device: SyntheticDevice,
    pub config: SamplerConfig,
}

impl SamplerPickerFactory {
    /// Fails early (before the server starts) when the device cannot be
    /// used, with the driver's reason.
    pub fn check(&self) -> Result<(), String> {
        self.build(0).map(drop)
    }
}

impl PickerFactory for SamplerPickerFactory {
    fn build(&self, _core: usize) -> Result<Box<dyn Picker>, String> {
        let (sampler, name): (Box<dyn TokenSampler>, String) = match self.device {
            SyntheticDevice::Cuda(n) => (
                Box::new(BatchSampler::new(n, self.config).map_err(|e| format!("cuda:{n}: {e}"))?),
                format!("cuda:{n}"),
            ),
            SyntheticDevice::CpuSampler => (
                Box::new(CpuSampler::new(self.config).map_err(|e| e.to_string())?),
                "cpu-sampler".into(),
            ),
            SyntheticDevice::Hash => unreachable!("the hash picker is the backend's own default"),
        };
        Ok(Box::new(SamplerPicker {
            sampler,
            name,
            rows: Vec::with_capacity(self.config.max_batch),
        }))
    }
}

struct SamplerPicker {
    sampler: Box<dyn TokenSampler>,
    name: String,
    /// Reused conversion buffer: no allocation per batch.
    rows: Vec<SampleRow>,
}

impl Picker for SamplerPicker {
    fn name(&self) -> &str {
        &self.name
    }

    /// The sampler's batch: one launch (or CPU reference call) per batch
    /// the backend hands over, its tokens delivered before the next.
    fn batch_rows(&self) -> usize {
        self.sampler.config().max_batch
    }

    fn pick(&mut self, rows: &[PickRow], out: &mut [u32]) -> Result<(), String> {
        let batch = self.sampler.config().max_batch;
        for (chunk, ids) in rows.chunks(batch).zip(out.chunks_mut(batch)) {
            self.rows.clear();
            self.rows.extend(chunk.iter().map(|r| SampleRow {
                seed: r.seed,
                position: r.position,
                temperature: r.temperature,
                top_k: r.top_k,
                top_p: r.top_p,
            }));
            self.sampler
                .sample(&self.rows, ids)
                .map_err(|e| format!("{}: {e}", self.name))?;
        }
        Ok(())
    }
}
