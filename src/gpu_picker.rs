//! Token choice for the synthetic backend by real sampling: each token is
//! drawn from a generated logit row with temperature softmax, top-k, top-p
//! and a seeded draw, on the GPU (`cuda[:N]`, the kernels of cnse-kernels,
//! one batch per loop turn across all streams) or with the CPU reference
//! (`cpu-sampler`, the same token ids, for side-by-side measurement).

use cnse_backend::synthetic::{PickRun, Picker, PickerFactory};
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

    fn pick(&mut self, runs: &[PickRun], out: &mut [u32]) -> Result<(), String> {
        let batch = self.sampler.config().max_batch.max(1);
        let mut at = 0;
        for row in runs.iter().flat_map(PickRun::rows) {
            self.rows.push(SampleRow {
                seed: row.seed,
                position: row.position,
                temperature: row.temperature,
                top_k: row.top_k,
                top_p: row.top_p,
            });
            if self.rows.len() == batch {
                at = self.launch(out, at)?;
            }
        }
        if !self.rows.is_empty() {
            self.launch(out, at)?;
        }
        Ok(())
    }
}

impl SamplerPicker {
    /// Samples the rows gathered into `out[at..]`; returns where the next
    /// batch's ids go.
    fn launch(&mut self, out: &mut [u32], at: usize) -> Result<usize, String> {
        let n = self.rows.len();
        let sampled = self.sampler.sample(&self.rows, &mut out[at..at + n]);
        self.rows.clear();
        sampled.map_err(|e| format!("{}: {e}", self.name))?;
        Ok(at + n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnse_backend::synthetic::PickRow;

    /// Runs longer than the sampler's batch, shorter, and straddling its
    /// boundaries: every token's id is the one its row gets alone.
    #[test]
    fn runs_are_sampled_row_by_row_across_batches() {
        let config = SamplerConfig {
            vocab: 512,
            max_batch: 5,
        };
        let mut picker = SamplerPickerFactory {
            device: SyntheticDevice::CpuSampler,
            config,
        }
        .build(0)
        .unwrap();
        let runs: Vec<PickRun> = [3u32, 7, 1, 12, 0, 5]
            .iter()
            .enumerate()
            .map(|(i, &tokens)| PickRun {
                first: PickRow {
                    seed: 11 * i as u64,
                    position: 4 * i as u64,
                    temperature: 0.8,
                    top_k: 40,
                    top_p: 0.9,
                },
                tokens,
            })
            .collect();
        let total = runs.iter().map(|r| r.tokens as usize).sum();
        let mut ids = vec![u32::MAX; total];
        picker.pick(&runs, &mut ids).unwrap();
        let mut alone = CpuSampler::new(config).unwrap();
        let rows: Vec<PickRow> = runs.iter().flat_map(PickRun::rows).collect();
        for (row, &id) in rows.iter().zip(&ids) {
            let mut one = [0u32];
            let r = SampleRow {
                seed: row.seed,
                position: row.position,
                temperature: row.temperature,
                top_k: row.top_k,
                top_p: row.top_p,
            };
            alone.sample(&[r], &mut one).unwrap();
            assert_eq!(id, one[0], "{row:?}");
        }
        assert_eq!(rows.len(), total);
    }
}
