//! `cnse-dp gpu bench-sampling` (and the sampling part of `gpu bench`): the
//! GPU `BatchSampler` against three CPU samplers that give the same ids:
//! the one-core reference `CpuSampler`, the vectorised `ParallelCpuSampler`
//! on one thread, and the same on N threads (all cores by default), so the
//! GPU's speedup is stated against the best this CPU does, not only against
//! the reference (issue 13, item 7). Without a GPU the CPU rows still run.

use std::time::Instant;

use anyhow::{bail, Result};
use cnse_kernels::sampling::cpu::CpuSampler;
use cnse_kernels::{BatchSampler, ParallelCpuSampler, SampleRow, SamplerConfig, TokenSampler};

use crate::gpu::median;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Rows per batch.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Vocabulary (logits per row).
    #[arg(long, default_value_t = 131072)]
    pub(crate) vocab: u32,
    /// Threads of the multi-threaded CPU sampler (0: all cores).
    #[arg(long, default_value_t = 0)]
    pub(crate) threads: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Only the CPU samplers, even where there is a GPU.
    #[arg(long)]
    pub(crate) cpu_only: bool,
    /// Timed batches of the reference (the median is reported; the other
    /// CPU samplers run 3 times as many, the GPU 30).
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
}

pub(crate) fn run(a: Args) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let gpu_line = if a.cpu_only {
        Err("--cpu-only".to_string())
    } else {
        match crate::gpu::device_line(a.device) {
            Ok(line) => Ok(line),
            Err(e) => Err(format!("{e:#}")),
        }
    };
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match &gpu_line {
            Ok(line) => line.clone(),
            Err(why) => format!("no GPU row ({why})"),
        }
    );
    bench_sampling(a.device, a.batch, a.vocab, a.threads, a.reps, gpu_line.is_ok())
}

struct Case {
    label: &'static str,
    temperature: f32,
    top_k: u32,
    top_p: f32,
}

const CASES: [Case; 4] = [
    Case {
        label: "T=0.8 top_k=50 top_p=0.95",
        temperature: 0.8,
        top_k: 50,
        top_p: 0.95,
    },
    Case {
        label: "T=1.0 top_p=0.9 (no top-k)",
        temperature: 1.0,
        top_k: 0,
        top_p: 0.9,
    },
    Case {
        label: "T=1.0 plain sampling",
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
    },
    Case {
        label: "T=0 greedy",
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
    },
];

/// Median seconds per batch of `reps` batches, each batch's ids checked
/// against the reference's ids of the same step.
fn time_batches(
    s: &mut dyn TokenSampler,
    reps: usize,
    rows_at: &dyn Fn(u64) -> Vec<SampleRow>,
    want: &[Vec<u32>],
    ids: &mut [u32],
) -> Result<(f64, bool)> {
    s.sample(&rows_at(100), ids)?; // warm: page-in of scratch, pool threads awake
    let mut times = Vec::with_capacity(reps);
    let mut equal = true;
    for rep in 0..reps {
        let step = rep % want.len();
        let rows = rows_at(100 + step as u64);
        let t = Instant::now();
        s.sample(&rows, ids)?;
        times.push(t.elapsed().as_secs_f64());
        equal &= ids == want[step].as_slice();
    }
    Ok((median(times), equal))
}

/// Sampling kernels against the CPU samplers, `rows` of `vocab` logits.
pub(crate) fn bench_sampling(
    device: usize,
    rows: usize,
    vocab: u32,
    threads: usize,
    reps: usize,
    with_gpu: bool,
) -> Result<()> {
    let config = SamplerConfig { vocab, max_batch: rows };
    let mut gpu = if with_gpu {
        Some(BatchSampler::new(device, config)?)
    } else {
        None
    };
    let mut reference = CpuSampler::new(config)?;
    let mut one = ParallelCpuSampler::new(config, 1)?;
    let mut many = ParallelCpuSampler::new(config, threads)?;
    println!();
    println!(
        "sampling {rows} rows x {vocab} vocab, same ids everywhere: CPU reference (CpuSampler, 1 thread), \
         CPU vectorised ({}, 1 thread), CPU vectorised ({}, {} threads){}",
        one.simd().name(),
        many.simd().name(),
        many.threads(),
        if gpu.is_some() {
            ", GPU BatchSampler (logits generated on the device)"
        } else {
            ""
        }
    );
    println!("seconds per batch, median; ratios are the first's time over the second's");
    let n = many.threads();
    println!(
        "| {:<28} | {:>10} | {:>10} | {:>10} | {:>9} | {:>8} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} | ids equal",
        "rows",
        "CPU ref",
        "CPU vec 1",
        format!("CPU vec {n}"),
        "GPU",
        "ref/vec1",
        format!("ref/vec{n}"),
        format!("vec1/vec{n}"),
        "GPU x ref",
        "GPU x vec1",
        format!("GPU x vec{n}"),
    );
    let mut ids = vec![0u32; rows];
    for case in &CASES {
        let rows_at = |step: u64| -> Vec<SampleRow> {
            (0..rows as u64)
                .map(|r| SampleRow {
                    seed: 1000 + r,
                    position: step,
                    temperature: case.temperature,
                    top_k: case.top_k,
                    top_p: case.top_p,
                })
                .collect()
        };
        let mut want = Vec::with_capacity(reps);
        let mut ref_times = Vec::with_capacity(reps);
        for rep in 0..reps {
            let r = rows_at(100 + rep as u64);
            let t = Instant::now();
            reference.sample(&r, &mut ids)?;
            ref_times.push(t.elapsed().as_secs_f64());
            want.push(ids.clone());
        }
        let t_ref = median(ref_times);
        let (t_one, eq_one) = time_batches(&mut one, 3 * reps, &rows_at, &want, &mut ids)?;
        let (t_many, eq_many) = time_batches(&mut many, 3 * reps, &rows_at, &want, &mut ids)?;
        let gpu_run = match gpu.as_mut() {
            Some(g) => Some(time_batches(g, 30, &rows_at, &want, &mut ids)?),
            None => None,
        };
        let equal = eq_one && eq_many && gpu_run.is_none_or(|(_, eq)| eq);
        let ms = |s: f64| format!("{:.3} ms", s * 1e3);
        let x = |a: f64, b: f64| format!("{:.1}x", a / b);
        let (g_time, g_ref, g_one, g_many) = match gpu_run {
            Some((g, _)) => (ms(g), x(t_ref, g), x(t_one, g), x(t_many, g)),
            None => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {:<28} | {:>10} | {:>10} | {:>10} | {:>9} | {:>8} | {:>8} | {:>8} | {:>9} | {:>9} | {:>9} | {}",
            case.label,
            ms(t_ref),
            ms(t_one),
            ms(t_many),
            g_time,
            x(t_ref, t_one),
            x(t_ref, t_many),
            x(t_one, t_many),
            g_ref,
            g_one,
            g_many,
            if equal { "yes" } else { "NO" }
        );
        if !equal {
            bail!("a sampler gave other ids than the CPU reference for {}", case.label);
        }
    }
    Ok(())
}
