//! The embedded synthetic backend as `serve` and `demo` build it: paced by
//! TTFT and token interval, its tokens picked by the hash picker or sampled
//! on a device (`gpu_picker`), its sequences bounded per process.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use cnse_backend::synthetic::{SyntheticConfig, SyntheticFactory};
use cnse_backend::BackendFactory;
use cnse_kernels::SamplerConfig;

use crate::gpu_picker::{SamplerPickerFactory, SyntheticDevice};

fn paced(ttft_us: u64, interval_us: u64) -> SyntheticConfig {
    SyntheticConfig {
        ttft: Duration::from_micros(ttft_us),
        token_interval: Duration::from_micros(interval_us),
        ..Default::default()
    }
}

pub fn synthetic_factory(ttft_us: u64, interval_us: u64) -> Arc<dyn BackendFactory> {
    Arc::new(SyntheticFactory::new(paced(ttft_us, interval_us)))
}

/// The synthetic backend with its tokens sampled by `device` (see
/// `gpu_picker`), with `slots` sequences for the process over `threads`
/// cores (0 slots: unbounded).
pub fn synthetic_factory_on(
    ttft_us: u64,
    interval_us: u64,
    device: SyntheticDevice,
    vocab: u32,
    (slots, threads): (usize, usize),
) -> anyhow::Result<Arc<dyn BackendFactory>> {
    let mut cfg = paced(ttft_us, interval_us);
    if device != SyntheticDevice::Hash {
        let picker = SamplerPickerFactory {
            device,
            config: SamplerConfig {
                vocab,
                max_batch: cnse_kernels::sampling::BATCH_MAX,
            },
        };
        picker
            .check()
            .map_err(anyhow::Error::msg)
            .context("--synthetic-device")?;
        cfg.picker = Arc::new(picker);
    }
    let f = SyntheticFactory::new(cfg);
    Ok(Arc::new(if slots == 0 {
        f
    } else {
        f.with_process_slots(slots, threads)
    }))
}
