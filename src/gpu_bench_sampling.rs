//! `cnse-dp gpu bench`, sampling part: the GPU `BatchSampler` against the
//! `CpuSampler` reference on one core, ids compared.

use std::time::Instant;

use anyhow::{bail, Result};
use cnse_kernels::sampling::cpu::CpuSampler;
use cnse_kernels::{BatchSampler, SampleRow, SamplerConfig, TokenSampler};

use crate::gpu::median;

/// Sampling kernels against the CPU reference, `rows` of `vocab` logits.
pub(crate) fn bench_sampling(device: usize, rows: usize, vocab: u32) -> Result<()> {
    let config = SamplerConfig { vocab, max_batch: rows };
    let mut gpu = BatchSampler::new(device, config)?;
    let mut cpu = CpuSampler::new(config)?;
    println!();
    println!(
        "sampling {} rows x {} vocab: GPU BatchSampler (logits generated on the device) vs CpuSampler, one core",
        rows, vocab
    );
    println!(
        "| {:<40} | {:>10} | {:>10} | {:>8} | ids equal",
        "rows", "GPU/batch", "CPU/batch", "speedup"
    );
    let cases: [(&str, f32, u32, f32); 4] = [
        ("T=0.8 top_k=50 top_p=0.95", 0.8, 50, 0.95),
        ("T=1.0 top_p=0.9 (no top-k)", 1.0, 0, 0.9),
        ("T=1.0 plain sampling", 1.0, 0, 1.0),
        ("T=0 greedy", 0.0, 0, 1.0),
    ];
    let mut ids_gpu = vec![0u32; rows];
    let mut ids_cpu = vec![0u32; rows];
    for (label, temperature, top_k, top_p) in cases {
        let rows_at = |step: u64| -> Vec<SampleRow> {
            (0..rows as u64)
                .map(|r| SampleRow {
                    seed: 1000 + r,
                    position: step,
                    temperature,
                    top_k,
                    top_p,
                })
                .collect()
        };
        for step in 0..3 {
            gpu.sample(&rows_at(step), &mut ids_gpu)?;
        }
        let gpu_iters = 30;
        let mut gt = Vec::new();
        for step in 0..gpu_iters {
            let rows = rows_at(100 + step);
            let t = Instant::now();
            gpu.sample(&rows, &mut ids_gpu)?;
            gt.push(t.elapsed().as_secs_f64());
        }
        let mut ct = Vec::new();
        let mut equal = true;
        for step in 0..3u64 {
            let rows = rows_at(100 + step);
            let t = Instant::now();
            cpu.sample(&rows, &mut ids_cpu)?;
            ct.push(t.elapsed().as_secs_f64());
            gpu.sample(&rows, &mut ids_gpu)?;
            equal &= ids_gpu == ids_cpu;
        }
        let (g, c) = (median(gt), median(ct));
        println!(
            "| {:<40} | {:>7.3} ms | {:>7.1} ms | {:>7.1}x | {}",
            label,
            g * 1e3,
            c * 1e3,
            c / g,
            if equal { "yes" } else { "NO" }
        );
        if !equal {
            bail!("GPU and CPU sampled different ids for {label}");
        }
    }
    Ok(())
}
