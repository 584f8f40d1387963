//! Token post-processing: temperature softmax, top-k, top-p, seeded sampling
//! and argmax over batches of logit rows, on the GPU (`gpu`) and as a CPU
//! reference (`cpu`) that gives the same token ids for the same seeds; the
//! same ids again from the vectorised row (`fast`) on a pool of threads
//! (`parallel`), the fair CPU side of the GPU comparison.

pub mod cpu;
pub mod fast;
pub mod gpu;
pub mod math;
pub mod parallel;

use crate::KernelError;

/// One row of a sampling batch: which logits (generated from `seed` and
/// `position`) and how to sample them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleRow {
    pub seed: u64,
    pub position: u64,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 means no top-k filter.
    pub top_k: u32,
    /// 1 means no top-p filter.
    pub top_p: f32,
}

/// Shape of a sampler: vocabulary size and the largest batch it accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SamplerConfig {
    pub vocab: u32,
    pub max_batch: usize,
}

/// Largest batch a sampler may be configured for; with a 256k vocabulary the
/// logit buffer is then 1 GiB of device memory.
pub const BATCH_MAX: usize = 1024;

impl SamplerConfig {
    pub fn check(&self) -> Result<(), KernelError> {
        check_vocab(self.vocab as u64)?;
        if self.max_batch == 0 || self.max_batch > BATCH_MAX {
            return Err(KernelError::Shape {
                op: "sampler config",
                detail: format!("max_batch {} outside 1..={BATCH_MAX}", self.max_batch),
            });
        }
        Ok(())
    }

    pub(crate) fn check_call(&self, rows: &[SampleRow], out_ids: &[u32]) -> Result<(), KernelError> {
        if rows.len() > self.max_batch {
            return Err(KernelError::Shape {
                op: "sample",
                detail: format!("{} rows exceed max_batch {}", rows.len(), self.max_batch),
            });
        }
        if out_ids.len() != rows.len() {
            return Err(KernelError::Shape {
                op: "sample",
                detail: format!("{} output ids for {} rows", out_ids.len(), rows.len()),
            });
        }
        Ok(())
    }
}

/// A batch sampler: generates each row's logits from (seed, position) and
/// samples one token per row. `BatchSampler` (GPU) and `CpuSampler` give the
/// same ids for the same rows.
pub trait TokenSampler {
    fn config(&self) -> SamplerConfig;
    fn sample(&mut self, rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError>;
}

pub(crate) fn check_vocab(vocab: u64) -> Result<(), KernelError> {
    if vocab == 0 || vocab > math::VOCAB_MAX as u64 {
        return Err(KernelError::Shape {
            op: "vocab",
            detail: format!("{vocab} outside 1..={}", math::VOCAB_MAX),
        });
    }
    Ok(())
}

/// 1/T, with T = 0 mapped to 0 (greedy). Rejects negative and non-finite T.
pub(crate) fn inv_temperature(t: f32) -> Result<f32, KernelError> {
    if !t.is_finite() || t < 0.0 {
        return Err(KernelError::InvalidRow(format!(
            "temperature {t} must be finite and >= 0"
        )));
    }
    if t == 0.0 {
        return Ok(0.0);
    }
    let inv = 1.0 / t;
    if !inv.is_finite() {
        return Err(KernelError::InvalidRow(format!("temperature {t} is too small")));
    }
    Ok(inv)
}

pub(crate) fn check_top_p(p: f32) -> Result<(), KernelError> {
    if !(0.0..=1.0).contains(&p) {
        return Err(KernelError::InvalidRow(format!("top_p {p} must be within 0..=1")));
    }
    Ok(())
}

/// A row as the kernels read it; 32 bytes, laid out as `RowParams` in
/// `cuda/sampling.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowParams {
    pub inv_temp: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub reserved: u32,
    pub row_key: u64,
    pub draw: u64,
}

const _: () = assert!(std::mem::size_of::<RowParams>() == 32);

impl RowParams {
    pub fn from_row(row: &SampleRow) -> Result<Self, KernelError> {
        check_top_p(row.top_p)?;
        let row_key = math::row_key(row.seed, row.position);
        Ok(Self {
            inv_temp: inv_temperature(row.temperature)?,
            top_p: row.top_p,
            top_k: row.top_k,
            reserved: 0,
            row_key,
            draw: math::row_draw(row_key),
        })
    }
}
