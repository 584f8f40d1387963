//! `cnse-dp gpu bench-verify`: issue 15's numbers side by side in one run.
//!
//! 1. The SHA-256 kernel alone over a blob already in device memory, for
//!    each leaf size and launch window (how many leaves are in flight).
//! 2. Loads from the page cache: unverified, verified on the host, verified
//!    on the GPU, for each thread count and mover, with the host CPU time
//!    the process spent per second of load (cores busy).
//! 3. Resident blobs (`gpu_bench_resident.rs`): registered once, loaded
//!    again and again; the first, registering load per registration shape.
//! 4. With `--cold` (root): page cache dropped before each run; a plain
//!    sequential read of the file against the loads.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::{
    DeviceBuffer, GpuVerifier, GpuVerifyOptions, LeafLaunch, LeafSpec, LoadOptions, Mover, Readahead, SourceMode,
    Streamer, StreamerConfig,
};

use crate::gpu::{device_line, gbps, make_blob, median, Pool};
use crate::gpu_load::compare_with_file;
use crate::thread_cpu::{ThreadCpu, ThreadUse, BUSY_SHARE};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Blob to load; created with pseudo-random bytes if missing.
    #[arg(long, default_value = "/tmp/cnse-gpu-bench.blob")]
    pub(crate) blob: PathBuf,
    /// Size of a created blob, GiB.
    #[arg(long, default_value_t = 4)]
    pub(crate) size_gib: u64,
    /// Chunk size, MiB.
    #[arg(long, default_value_t = 16)]
    pub(crate) chunk_mib: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Timed repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// Leaf sizes of the kernel sweep, KiB (the first is used for loads).
    #[arg(long, value_delimiter = ',', default_value = "64,16,32,128,256,1024")]
    pub(crate) leaf_kib: Vec<u64>,
    /// Launch windows of the kernel sweep, MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024,4096")]
    pub(crate) window_mib: Vec<u64>,
    /// Launch window of the GPU-verified loads, MiB.
    #[arg(long, default_value_t = 512)]
    pub(crate) load_window_mib: u64,
    /// Worker thread counts of the loads.
    #[arg(long, value_delimiter = ',', default_value = "16,4,2")]
    pub(crate) threads: Vec<usize>,
    /// Also measure with a cold page cache (drops caches: needs root).
    #[arg(long)]
    pub(crate) cold: bool,
    /// Rounds of the cold measurements (each runs every cold row once).
    #[arg(long, default_value_t = 3)]
    pub(crate) cold_rounds: usize,
    /// Skip the kernel sweep.
    #[arg(long)]
    pub(crate) no_kernel: bool,
    /// Skip the resident-blob rows (registered once, loaded again and again).
    #[arg(long)]
    pub(crate) no_resident: bool,
    /// Only the resident-blob rows (with their own 16-thread staging row).
    #[arg(long, conflicts_with_all = ["no_resident", "cold"])]
    pub(crate) resident_only: bool,
    #[command(flatten)]
    pub(crate) pool: Pool,
}

/// Width of the label column of this file's load tables.
const LABEL_WIDTH: usize = 58;

/// A load table's header: a label column `width` wide, then time, rate,
/// cores, busy, top threads and the `ratios` column(s).
pub(crate) fn print_load_header(what: &str, width: usize, ratios: &str) {
    println!("{}", load_header(what, width, ratios));
}

fn load_header(what: &str, width: usize, ratios: &str) -> String {
    format!(
        "| {what:<width$} | {:>9} | {:>10} | {:>5} | {:>4} | {:<19} | {ratios}",
        "time", "rate", "cores", "busy", "top"
    )
}

/// A load table's row: run `m`'s time, rate and thread figures, then each
/// time of `vs` over its own (`vs` 1.0 s against 0.5 s reads `2.000x`).
pub(crate) fn print_load_row(label: &str, width: usize, size: u64, m: &ThreadUse, vs: &[f64]) {
    println!("{}", load_row(label, width, size, m, vs));
}

fn load_row(label: &str, width: usize, size: u64, m: &ThreadUse, vs: &[f64]) -> String {
    let ratios: Vec<String> = vs.iter().map(|b| format!("{:.3}x", b / m.wall_s)).collect();
    format!(
        "| {label:<width$} | {:>7.4} s | {:>5.2} GB/s | {:>5.2} | {:>4} | {:<19} | {}",
        m.wall_s,
        gbps(size, m.wall_s),
        m.cores(),
        m.busy(),
        m.top(4),
        ratios.join(" | ")
    )
}

/// The median run by wall time.
pub(crate) fn median_run(mut runs: Vec<ThreadUse>) -> ThreadUse {
    runs.sort_by(|a, b| a.wall_s.total_cmp(&b.wall_s));
    runs.swap_remove(runs.len() / 2)
}

fn print_header(what: &str) {
    print_load_header(what, LABEL_WIDTH, "vs first row");
}

/// One row: the median run by wall time, with that run's thread figures;
/// `base` is the group's first row (the unverified load).
fn print_row(label: &str, size: u64, runs: Vec<ThreadUse>, base: &mut Option<f64>) {
    let m = median_run(runs);
    let first = *base;
    base.get_or_insert(m.wall_s);
    print_load_row(label, LABEL_WIDTH, size, &m, first.as_slice());
}

fn drop_caches() -> Result<()> {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache (needs root)")
}

pub(crate) fn run(a: Args) -> Result<()> {
    cnse_kernels::device::devices()?;
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        device_line(a.device)?
    );
    let size = a.size_gib << 30;
    if std::fs::metadata(&a.blob).map(|m| m.len() != size).unwrap_or(true) {
        make_blob(&a.blob, size)?;
    }
    let chunk_bytes = a.chunk_mib << 20;
    let Some(&leaf_kib) = a.leaf_kib.first() else {
        bail!("--leaf-kib needs at least one size");
    };
    let leaf_bytes = leaf_kib << 10;
    cnse_store::check_leaf_bytes(leaf_bytes, chunk_bytes)?;
    let t = Instant::now();
    // As `store put` writes it (format 3): chunk digests are the Merkle
    // roots over the leaves, for the host-verified rows as for the GPU ones.
    let (owned, leaf_digests) = OwnedSpec::from_file_with_leaves(&a.blob, chunk_bytes, leaf_bytes, 16)?;
    println!(
        "blob {}: {size} bytes, {} chunks of {} MiB, {} leaves of {leaf_kib} KiB ({} KiB of leaf digests, {:.3} % of the blob); digests in {:.2} s",
        a.blob.display(),
        owned.chunk_digests.len(),
        a.chunk_mib,
        leaf_digests.len(),
        (leaf_digests.len() * 32) >> 10,
        (leaf_digests.len() * 32) as f64 * 100.0 / size as f64,
        t.elapsed().as_secs_f64()
    );
    let spec = owned.as_spec();
    let leaves = LeafSpec {
        leaf_bytes,
        digests: &leaf_digests,
    };
    let reps = a.reps.max(1);
    let max_threads = a.threads.iter().copied().max().unwrap_or(16);
    let mut st = Streamer::new(
        a.device,
        StreamerConfig {
            threads: max_threads,
            ..a.pool.config()
        },
    )?;
    let gpu = GpuVerifier::new(&st)?;
    let gv = GpuVerifyOptions {
        window_bytes: a.load_window_mib << 20,
    };
    if a.resident_only {
        if !st.supports_register() {
            bail!("the device lacks read-only host registration: resident blobs cannot be measured");
        }
        return crate::gpu_bench_resident::run(&a, &gpu, &spec, &leaves, gv, reps);
    }
    if !a.no_kernel {
        kernel_sweep(&a, &mut st, &gpu, &spec, &leaf_digests, reps)?;
    }

    println!();
    println!(
        "loads of {} GiB from the page cache (median of {reps}; cores = CPU s of all threads / wall s; \
         busy = threads on a CPU for >= {:.0} % of the load; top = the busiest threads' shares):",
        a.size_gib,
        BUSY_SHARE * 100.0
    );
    print_header("load");
    for mover in [Mover::Kernel, Mover::CopyEngine] {
        let mut ms = Streamer::new(
            a.device,
            StreamerConfig {
                threads: max_threads,
                mover,
                ..a.pool.config()
            },
        )?;
        for &n in &a.threads {
            let opts = |verify| LoadOptions::new(verify, SourceMode::Mmap, n);
            let mut base = None;
            for what in ["unverified", "verified on the host", "verified on the GPU"] {
                let mut runs = Vec::new();
                for _ in 0..reps {
                    let t = ThreadCpu::start();
                    let blob = match what {
                        "unverified" => ms.load(&spec, opts(false))?.0,
                        "verified on the host" => ms.load(&spec, opts(true))?.0,
                        _ => gpu.load(&mut ms, &spec, &leaves, opts(false), gv)?.0,
                    };
                    runs.push(t.finish());
                    drop(blob);
                }
                print_row(&format!("{what}, {n} threads, {mover}"), size, runs, &mut base);
            }
        }
    }
    if st.supports_register() {
        register_rows(&a, &gpu, &spec, &leaves, gv, reps)?;
        if !a.no_resident {
            crate::gpu_bench_resident::run(&a, &gpu, &spec, &leaves, gv, reps)?;
        }
    } else {
        println!("| device lacks read-only host registration: registered page cache not measured");
    }
    let (blob, _) = gpu.load(
        &mut st,
        &spec,
        &leaves,
        LoadOptions::new(false, SourceMode::Mmap, max_threads),
        gv,
    )?;
    compare_with_file(&blob.buffer, &a.blob)?;
    drop(blob);
    println!("check: device bytes of the GPU-verified load equal the file");
    if a.cold {
        cold(&a, &mut st, &gpu, &spec, &leaves, gv, max_threads)?;
    }
    Ok(())
}

/// The page cache page-locked in place and read by the copy engines: no
/// host copy at all, so with GPU hashing the host only registers pages.
fn register_rows(
    a: &Args,
    gpu: &GpuVerifier,
    spec: &cnse_kernels::BlobSpec,
    leaves: &LeafSpec,
    gv: GpuVerifyOptions,
    reps: usize,
) -> Result<()> {
    let size = spec.size_bytes;
    for &n in &a.threads {
        let mut rs = Streamer::new(
            a.device,
            StreamerConfig {
                threads: n,
                mover: Mover::CopyEngine,
                ..a.pool.config()
            },
        )?;
        let opts = LoadOptions::new(false, SourceMode::Register, n);
        let mut base = None;
        for on_gpu in [false, true] {
            let mut runs = Vec::new();
            for _ in 0..reps {
                let t = ThreadCpu::start();
                let blob = if on_gpu {
                    gpu.load(&mut rs, spec, leaves, opts, gv)?.0
                } else {
                    rs.load(spec, opts)?.0
                };
                runs.push(t.finish());
                drop(blob);
            }
            let what = if on_gpu { "verified on the GPU" } else { "unverified" };
            print_row(
                &format!("{what}, registered page cache, {n} threads"),
                size,
                runs,
                &mut base,
            );
        }
    }
    Ok(())
}

fn kernel_sweep(
    a: &Args,
    st: &mut Streamer,
    gpu: &GpuVerifier,
    spec: &cnse_kernels::BlobSpec,
    leaf_digests: &[[u8; 32]],
    reps: usize,
) -> Result<()> {
    let size = spec.size_bytes;
    let (blob, _) = st.load(spec, LoadOptions::new(false, SourceMode::Mmap, st.config().threads))?;
    let h = gpu.hasher();
    let got = h.leaf_digests(&blob.buffer, size, (a.leaf_kib[0] << 10) as u32)?;
    if got != leaf_digests {
        bail!("GPU leaf digests differ from the host's (ring) for the bench blob");
    }
    println!("check: GPU leaf digests of the whole blob equal the host's (ring)");
    println!();
    println!(
        "SHA-256 kernel alone over {} GiB in device memory (median of {reps}):",
        a.size_gib
    );
    println!(
        "| {:>8} | {:>10} | {:>13} | {:>10} |",
        "leaf KiB", "window MiB", "leaves/launch", "rate"
    );
    let out = DeviceBuffer::new(st.context(), (size.div_ceil(4096) * 32) as usize)?;
    for &leaf_kib in &a.leaf_kib {
        let leaf = leaf_kib << 10;
        for &window_mib in &a.window_mib {
            let window = (window_mib << 20).max(leaf);
            let per_launch = window / leaf;
            let leaves = size.div_ceil(leaf);
            let mut times = Vec::new();
            for _ in 0..reps {
                let t0 = Instant::now();
                let mut first = 0;
                while first < leaves {
                    let n = per_launch.min(leaves - first);
                    let launch = LeafLaunch {
                        data: blob.buffer.device_ptr(),
                        size,
                        leaf_bytes: leaf as u32,
                        first,
                        count: n,
                        expect: 0,
                        out: out.device_ptr() + 32 * first,
                    };
                    // SAFETY: the blob buffer holds `size` bytes and `out` 32
                    // bytes per 4 KiB leaf, more than any sweep needs; both
                    // outlive the `sync` below.
                    unsafe { h.queue(&launch) }?;
                    first += n;
                }
                h.sync()?;
                times.push(t0.elapsed().as_secs_f64());
            }
            println!(
                "| {leaf_kib:>8} | {window_mib:>10} | {per_launch:>13} | {:>5.1} GB/s |",
                gbps(size, median(times))
            );
        }
    }
    Ok(())
}

fn cold(
    a: &Args,
    st: &mut Streamer,
    gpu: &GpuVerifier,
    spec: &cnse_kernels::BlobSpec,
    leaves: &LeafSpec,
    gv: GpuVerifyOptions,
    threads: usize,
) -> Result<()> {
    const ROWS: [&str; 7] = [
        "sequential read(2), 16 MiB buffer (dd bs=16M)",
        "unverified",
        "unverified + read-ahead",
        "verified on the GPU",
        "verified on the GPU + read-ahead",
        "verified on the host",
        "verified on the host + read-ahead",
    ];
    let size = spec.size_bytes;
    let reps = a.cold_rounds.max(1);
    println!();
    println!(
        "cold page cache (dropped before each run), {} GiB; {reps} rounds, each runs every row once in turn \
         (the virtual disk's rate drifts, so rows are compared within rounds); per round, then the median:",
        a.size_gib
    );
    let opts = |verify| LoadOptions::new(verify, SourceMode::Mmap, threads);
    let mut buf = vec![0u8; 16 << 20];
    let mut times = vec![Vec::new(); ROWS.len()];
    for round in 0..reps {
        for (row, what) in ROWS.iter().enumerate() {
            drop_caches()?;
            let t0 = Instant::now();
            if row == 0 {
                let mut f = std::fs::File::open(&a.blob)?;
                while f.read(&mut buf)? > 0 {}
            } else {
                let ra = what
                    .ends_with("read-ahead")
                    .then(|| Readahead::start(&a.blob, u64::MAX))
                    .transpose()?;
                let blob = match (*what, &ra) {
                    ("unverified", _) => st.load(spec, opts(false))?.0,
                    ("verified on the host", _) => st.load(spec, opts(true))?.0,
                    ("unverified + read-ahead", Some(r)) => st.load_after(spec, opts(false), r)?.0,
                    ("verified on the host + read-ahead", Some(r)) => st.load_after(spec, opts(true), r)?.0,
                    (_, r) => gpu.load_after(st, spec, leaves, opts(false), gv, r.as_ref())?.0,
                };
                drop(ra);
                drop(blob);
            }
            times[row].push(t0.elapsed().as_secs_f64());
        }
        let seq = times[0][round];
        let line: Vec<String> = times
            .iter()
            .map(|t| format!("{:.2} GB/s ({:.2}x)", gbps(size, t[round]), seq / t[round]))
            .collect();
        println!("round {}: {}", round + 1, line.join(", "));
    }
    println!(
        "| {:<58} | {:>9} | {:>10} | vs sequential read (median of the per-round ratios)",
        "what", "time", "rate"
    );
    for (row, what) in ROWS.iter().enumerate() {
        let ratios: Vec<f64> = (0..reps).map(|r| times[0][r] / times[row][r]).collect();
        let s = median(times[row].clone());
        let label = if row == 0 {
            what.to_string()
        } else {
            format!("{what}, {threads} threads")
        };
        println!(
            "| {label:<58} | {s:>7.4} s | {:>5.2} GB/s | {:.2}x",
            gbps(size, s),
            median(ratios)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared printer writes the two benches' tables as each wrote
    /// them before (the format strings below are theirs).
    #[test]
    fn load_tables_keep_their_columns() {
        let m = ThreadUse {
            wall_s: 0.5,
            cpu_s: vec![0.45, 0.2, 0.01],
        };
        let size = 3 << 30;
        assert_eq!(
            load_header("load", LABEL_WIDTH, "vs first row"),
            format!(
                "| {:<58} | {:>9} | {:>10} | {:>5} | {:>4} | {:<19} | vs first row",
                "load", "time", "rate", "cores", "busy", "top"
            )
        );
        let (s, label) = (m.wall_s, "unverified, 1 threads, kernel");
        for (first, ratio) in [(None, String::new()), (Some(1.0), "2.000x".to_string())] {
            assert_eq!(
                load_row(label, LABEL_WIDTH, size, &m, Option::<f64>::as_slice(&first)),
                format!(
                    "| {label:<58} | {s:>7.4} s | {:>5.2} GB/s | {:>5.2} | {:>4} | {:<19} | {ratio}",
                    gbps(size, s),
                    m.cores(),
                    m.busy(),
                    m.top(4)
                )
            );
        }
        assert_eq!(
            load_row(label, 62, size, &m, &[1.0, 0.25]),
            format!(
                "| {label:<62} | {:>7.4} s | {:>5.2} GB/s | {:>5.2} | {:>4} | {:<19} | 2.000x | 0.500x",
                m.wall_s,
                gbps(size, m.wall_s),
                m.cores(),
                m.busy(),
                m.top(4)
            )
        );
        assert_eq!(
            load_header("load", 62, "ratios"),
            format!(
                "| {:<62} | {:>9} | {:>10} | {:>5} | {:>4} | {:<19} | ratios",
                "load", "time", "rate", "cores", "busy", "top"
            )
        );
    }
}
