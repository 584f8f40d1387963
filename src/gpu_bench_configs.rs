//! `cnse-dp gpu bench --configs`: named staging configurations measured
//! side by side (DMA alone, unverified and host-verified loads).

use anyhow::{bail, Context, Result};
use cnse_kernels::stream::COPY_GRANULE_DEFAULT;
use cnse_kernels::{BlobSpec, LoadOptions, Mover, Pipeline, SourceMode, Streamer, StreamerConfig};

use crate::gpu::{gbps, median, BenchArgs};

fn parse_config(s: &str) -> Result<StreamerConfig> {
    let f: Vec<&str> = s.split(':').collect();
    if f.len() != 5 {
        bail!("--configs entry {s:?} is not THREADS:SLOT_MIB:SLOTS:STREAMS:MOVER");
    }
    let n = |i: usize| {
        f[i].parse::<usize>()
            .with_context(|| format!("--configs entry {s:?}: field {}", i + 1))
    };
    let mover = match f[4] {
        "ce" => Mover::CopyEngine,
        "kernel" => Mover::Kernel,
        other => bail!("--configs entry {s:?}: mover {other:?} is not ce or kernel"),
    };
    Ok(StreamerConfig {
        threads: n(0)?,
        slot_bytes: n(1)? << 20,
        slots_per_thread: n(2)?,
        streams: n(3)?,
        write_combined: false,
        copy_granule_bytes: COPY_GRANULE_DEFAULT,
        mover,
    })
}

pub(crate) fn bench_configs(a: &BenchArgs, spec: &BlobSpec, reps: usize) -> Result<()> {
    let size = spec.size_bytes;
    println!("staging configurations, {} GiB, median of {reps}:", a.size_gib);
    println!(
        "| {:<44} | {:>9} | {:>9} | {:>9} |",
        "threads x slots x MiB, streams, mover", "DMA only", "load", "verified"
    );
    for c in &a.configs {
        let cfg = parse_config(c)?;
        let mut st = Streamer::new(a.device, cfg)?;
        let mut rate = |opts: LoadOptions| -> Result<f64> {
            let mut times = Vec::new();
            for _ in 0..reps {
                let (blob, r) = st.load(spec, opts)?;
                drop(blob);
                times.push(r.total_s);
            }
            Ok(gbps(size, median(times)))
        };
        let t = cfg.threads;
        let dma = rate(LoadOptions {
            pipeline: Pipeline::DmaOnly,
            ..LoadOptions::new(false, SourceMode::Mmap, t)
        })?;
        let load = rate(LoadOptions::new(false, SourceMode::Mmap, t))?;
        let verified = rate(LoadOptions::new(true, SourceMode::Mmap, t))?;
        println!(
            "| {:<44} | {dma:>9.2} | {load:>9.2} | {verified:>9.2} |",
            format!(
                "{} x {} x {}, {} streams, {}",
                t,
                cfg.slots_per_thread,
                cfg.slot_bytes >> 20,
                cfg.streams,
                cfg.mover
            )
        );
    }
    Ok(())
}
