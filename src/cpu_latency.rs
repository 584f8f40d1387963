//! `--cpu-dma-latency-us N`: holds the kernel's CPU latency request (PM QoS,
//! `/dev/cpu_dma_latency`) at N µs for as long as the process runs, as
//! tuned's latency-performance profile does. An idle CPU then stays out of
//! idle states whose exit takes longer than N (at 0 it polls instead of
//! halting), so a worker woken by a packet after an idle spell answers
//! without the wake-up cost of a deep idle state (largest on virtual
//! machines, where a halted vCPU leaves the guest). The cost: idle CPUs
//! burn their cycles (and power) while the request is held. The request
//! is the whole machine's and ends when the file is closed (process exit).

use std::fs::{File, OpenOptions};
use std::io::Write;

use anyhow::Context;

/// The open request; dropping it ends the request.
pub struct CpuLatencyHold {
    _file: File,
}

/// Opens `/dev/cpu_dma_latency` and writes `us` (as the kernel's binary
/// s32), when asked; `None` holds nothing.
pub fn hold(us: Option<u32>) -> anyhow::Result<Option<CpuLatencyHold>> {
    let Some(us) = us else { return Ok(None) };
    let value = i32::try_from(us).context("--cpu-dma-latency-us is too large")?;
    let mut file = OpenOptions::new()
        .write(true)
        .open("/dev/cpu_dma_latency")
        .context("--cpu-dma-latency-us: opening /dev/cpu_dma_latency (needs root)")?;
    file.write_all(&value.to_ne_bytes())
        .context("--cpu-dma-latency-us: writing /dev/cpu_dma_latency")?;
    Ok(Some(CpuLatencyHold { _file: file }))
}
