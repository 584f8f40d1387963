//! `cnse-dp gpu bench-verify`, resident blobs (issue 15): the blob's page
//! cache registered once and kept (`SourceMode::Resident`), then loaded
//! again and again with only DMA left to do.
//!
//! 1. First loads, which register the blob: per registration piece size,
//!    registering threads and prefault, the registration's time and rate,
//!    the whole first load, and the unregistration at eviction.
//! 2. Repeated loads of the resident blob, unverified and verified on the
//!    GPU, per mover and queueing threads, against the same process's
//!    unverified 16-thread staging load of the same blob.

use anyhow::Result;
use cnse_kernels::{
    BlobSpec, GpuVerifier, GpuVerifyOptions, LeafSpec, LoadOptions, Mover, Prefault, ResidentOptions, SourceMode,
    Streamer, StreamerConfig,
};

use crate::gpu::gbps;
use crate::gpu_verify_bench::{median_run, print_load_header, print_load_row, Args};
use crate::thread_cpu::{ThreadCpu, ThreadUse};

/// Workers of the resident rows' streamers: a load uses 1 or 2 of them,
/// but the streamer's streams (`streams`, at most one per worker) are all
/// used, chunk by chunk, so it is made with as many as the staging rows.
const STREAMER_THREADS: usize = 16;

/// Width of the label column of this file's tables.
const LABEL_WIDTH: usize = 62;

fn row(label: &str, size: u64, m: &ThreadUse, vs: &[f64]) {
    print_load_row(label, LABEL_WIDTH, size, m, vs);
}

fn streamer(a: &Args, threads: usize, mover: Mover) -> Result<Streamer> {
    Ok(Streamer::new(
        a.device,
        StreamerConfig {
            threads,
            mover,
            ..a.pool.config()
        },
    )?)
}

pub(crate) fn run(
    a: &Args,
    gpu: &GpuVerifier,
    spec: &BlobSpec,
    leaves: &LeafSpec,
    gv: GpuVerifyOptions,
    reps: usize,
) -> Result<()> {
    let size = spec.size_bytes;
    let budget = size.next_multiple_of(2 << 20);
    println!();
    println!(
        "resident blob, first loads (each registers the {} GiB blob, unverified, {} streams, copy engines; registered \
         ahead of the copies (then 1 queueing thread) or chunk by chunk inside the load; then evicted: budget 0; \
         median of {reps} by load time):",
        a.size_gib,
        a.pool.config().streams.min(STREAMER_THREADS)
    );
    println!(
        "| {:<62} | {:>9} | {:>10} | {:>9} | {:>10} | {:>5} | {:>4} | {:>10}",
        "registration", "register", "reg. rate", "load", "load rate", "cores", "busy", "unregister"
    );
    let mut st = streamer(a, STREAMER_THREADS, Mover::CopyEngine)?;
    // (piece bytes, threads, prefault, overlapped): registered ahead by
    // `threads` registering threads, or chunk by chunk inside the load by
    // `threads` queueing threads.
    let mut plan: Vec<(u64, usize, Prefault, bool)> = Vec::new();
    for piece_mib in [16u64, 64, 256, 0] {
        for threads in [1, 2] {
            plan.push((piece_mib << 20, threads, Prefault::None, false));
        }
    }
    plan.push((64 << 20, 2, Prefault::Populate, false));
    plan.push((64 << 20, 2, Prefault::HugePage, false));
    for threads in [1, 2] {
        plan.push((spec.chunk_bytes, threads, Prefault::None, true));
    }
    for (piece_bytes, threads, prefault, overlap) in plan {
        let mut runs = Vec::new();
        for _ in 0..reps {
            let o = ResidentOptions {
                budget_bytes: budget,
                register_threads: threads,
                piece_bytes: if overlap { 64 << 20 } else { piece_bytes },
                prefault,
                overlap,
            };
            st.set_resident(o)?;
            let unreg0 = st.resident_stats().unregister_s;
            let t = ThreadCpu::start();
            let load_threads = if overlap { threads } else { 1 };
            let (blob, report) = st.load(spec, LoadOptions::new(false, SourceMode::Resident, load_threads))?;
            let u = t.finish();
            drop(blob);
            st.set_resident(ResidentOptions { budget_bytes: 0, ..o })?;
            runs.push((u, report.register_s, st.resident_stats().unregister_s - unreg0));
        }
        runs.sort_by(|x, y| x.0.wall_s.total_cmp(&y.0.wall_s));
        let (m, reg_s, unreg_s) = runs.swap_remove(runs.len() / 2);
        let label = match (overlap, piece_bytes) {
            (true, _) => format!(
                "per chunk inside the load, overlapped with copies, {threads} threads{}",
                if threads > 1 { " (summed)" } else { "" }
            ),
            (false, 0) => format!("ahead: whole blob, {threads} registering threads, {prefault}"),
            (false, p) => format!(
                "ahead: {} MiB pieces, {threads} registering threads, {prefault}",
                p >> 20
            ),
        };
        println!(
            "| {:<62} | {reg_s:>7.4} s | {:>5.2} GB/s | {:>7.4} s | {:>5.2} GB/s | {:>5.2} | {:>4} | {unreg_s:>8.4} s",
            label,
            gbps(size, reg_s),
            m.wall_s,
            gbps(size, m.wall_s),
            m.cores(),
            m.busy()
        );
    }
    drop(st);

    println!();
    println!(
        "resident blob, repeated loads after the first (median of {reps}); ratios: vs the resident unverified \
         load with the same mover and threads | vs the unverified 16-thread staging load (copy kernel, \
         page cache) measured first in this section:"
    );
    print_load_header("load", LABEL_WIDTH, "ratios");
    let mut staging = streamer(a, 16, Mover::Kernel)?;
    let mut runs = Vec::new();
    for _ in 0..reps {
        let t = ThreadCpu::start();
        let blob = staging.load(spec, LoadOptions::new(false, SourceMode::Mmap, 16))?.0;
        runs.push(t.finish());
        drop(blob);
    }
    drop(staging);
    let base16 = median_run(runs);
    row("unverified, 16 threads, copy kernel, staging", size, &base16, &[]);
    for mover in [Mover::Kernel, Mover::CopyEngine] {
        let mut st = streamer(a, STREAMER_THREADS, mover)?;
        st.set_resident(ResidentOptions {
            budget_bytes: budget,
            ..Default::default()
        })?;
        // The first load registers; the rows time the loads after it.
        let (blob, report) = st.load(spec, LoadOptions::new(false, SourceMode::Resident, 1))?;
        drop(blob);
        println!(
            "| ({mover}: first load registered in {:.4} s, whole load {:.4} s, {:.2} GB/s)",
            report.register_s,
            report.total_s,
            gbps(size, report.total_s)
        );
        for threads in [1usize, 2] {
            let opts = LoadOptions::new(false, SourceMode::Resident, threads);
            let mut base = None;
            for on_gpu in [false, true] {
                let mut runs = Vec::new();
                for _ in 0..reps {
                    let t = ThreadCpu::start();
                    let blob = if on_gpu {
                        gpu.load(&mut st, spec, leaves, opts, gv)?.0
                    } else {
                        st.load(spec, opts)?.0
                    };
                    runs.push(t.finish());
                    drop(blob);
                }
                let m = median_run(runs);
                let b = *base.get_or_insert(m.wall_s);
                let what = if on_gpu { "verified on the GPU" } else { "unverified" };
                row(
                    &format!("{what}, resident, {threads} threads, {mover}"),
                    size,
                    &m,
                    &[b, base16.wall_s],
                );
            }
        }
        let s = st.resident_stats();
        println!(
            "| ({mover}: resident stats: {} hits, {} misses, {} registrations, {} entries, {} bytes)",
            s.hits, s.misses, s.registrations, s.entries, s.resident_bytes
        );
        let (blob, _) = gpu.load(
            &mut st,
            spec,
            leaves,
            LoadOptions::new(false, SourceMode::Resident, 2),
            gv,
        )?;
        crate::gpu_load::compare_with_file(&blob.buffer, spec.path)?;
        println!("check: device bytes of the GPU-verified resident load ({mover}) equal the file");
    }
    Ok(())
}
