//! `cnse-dp gpu`: device info, verified model loads into GPU memory, and the
//! side-by-side benchmark of the GPU path (docs/GPU.md, docs/BENCHMARKS.md).
//!
//! `gpu load` lives in `gpu_load.rs` (the model story, one stage per call)
//! and `gpu bench-verify` in `gpu_verify_bench.rs`, `gpu bench`'s load part
//! in `gpu_bench_load.rs`, its sampling part (also `gpu bench-sampling`) in
//! `gpu_bench_sampling.rs`; this file parses the subcommands and holds
//! `info` and `bench`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Subcommand, ValueEnum};
use cnse_kernels::{Mover, SourceMode, StreamerConfig};

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Driver, NVRTC and device properties.
    Info,
    /// Stream a model from the store into GPU memory, verifying every chunk;
    /// prints the time and GB/s of each phase.
    Load(crate::gpu_load::LoadArgs),
    /// Measure the GPU path's targets side by side in one run.
    Bench(BenchArgs),
    /// GPU SHA-256: kernel sweep over leaf sizes, verified loads (host vs
    /// GPU hashing vs none), cold-cache loads against a sequential read.
    BenchVerify(crate::gpu_verify_bench::Args),
    /// Sampling: the GPU against the one-core CPU reference and the
    /// vectorised CPU sampler on one and on all cores, ids compared; the CPU
    /// rows run without a GPU too.
    BenchSampling(crate::gpu_bench_sampling::Args),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum SourceArg {
    /// The fastest measured source (`mmap`).
    Auto,
    /// Hash and copy from a map of the blob into pinned staging.
    Mmap,
    /// pread into pinned staging, hash there.
    Pread,
    /// Page-lock the mapped page cache and DMA from it in place.
    Register,
}

impl SourceArg {
    pub(crate) fn pick(self) -> SourceMode {
        match self {
            // Measured (docs/GPU.md): registering the page cache costs more
            // than the copy it saves, so `auto` copies through staging.
            SourceArg::Auto | SourceArg::Mmap => SourceMode::Mmap,
            SourceArg::Pread => SourceMode::Pread,
            SourceArg::Register => SourceMode::Register,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum MoverArg {
    /// cuMemcpyHtoDAsync (a DMA copy engine).
    CopyEngine,
    /// A kernel whose threads read the mapped staging slot over PCIe.
    Kernel,
    /// Synchronous cuMemcpyHtoD per slot (measurement only).
    Sync,
}

impl From<MoverArg> for Mover {
    fn from(m: MoverArg) -> Self {
        match m {
            MoverArg::CopyEngine => Mover::CopyEngine,
            MoverArg::Kernel => Mover::Kernel,
            MoverArg::Sync => Mover::Sync,
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct Pool {
    /// Hashing/copy worker threads (default: cores, at most 16).
    #[arg(long)]
    threads: Option<usize>,
    /// Size of one pinned staging slot, MiB.
    #[arg(long, default_value_t = 2)]
    slot_mib: usize,
    /// Copies in flight per worker (2 = double buffering).
    #[arg(long, default_value_t = 3)]
    slots_per_thread: usize,
    /// CUDA streams shared by the workers.
    #[arg(long, default_value_t = 8)]
    streams: usize,
    /// Allocate the staging pool write-combined (see docs/GPU.md).
    #[arg(long)]
    write_combined: bool,
    /// Size of each host memcpy into a slot when not verifying, KiB.
    #[arg(long, default_value_t = 256)]
    copy_granule_kib: usize,
    /// What moves staged bytes to the device (kernel falls back to the copy
    /// engines where NVRTC is missing).
    #[arg(long, value_enum, default_value = "kernel")]
    mover: MoverArg,
}

impl Pool {
    pub(crate) fn config(&self) -> StreamerConfig {
        let d = StreamerConfig::default();
        StreamerConfig {
            threads: self.threads.unwrap_or(d.threads),
            slot_bytes: self.slot_mib << 20,
            slots_per_thread: self.slots_per_thread,
            streams: self.streams,
            write_combined: self.write_combined,
            copy_granule_bytes: self.copy_granule_kib << 10,
            mover: self.mover.into(),
        }
    }
}

#[derive(clap::Args)]
pub(crate) struct BenchArgs {
    /// Blob to load; created with pseudo-random bytes if missing.
    #[arg(long, default_value = "/tmp/cnse-gpu-bench.blob")]
    pub(crate) blob: PathBuf,
    /// Size of a created blob, GiB.
    #[arg(long, default_value_t = 4)]
    pub(crate) size_gib: u64,
    /// Chunk size of the blob's manifest, MiB.
    #[arg(long, default_value_t = 16)]
    pub(crate) chunk_mib: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Thread counts of the verified-load sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub(crate) sweep: Vec<usize>,
    /// Timed repetitions of each load (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// Staging slot sizes (MiB) of the unverified-load sweep.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,32")]
    pub(crate) slot_sweep: Vec<usize>,
    /// Stream counts of the unverified-load sweep.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub(crate) stream_sweep: Vec<usize>,
    /// Sampling batch rows.
    #[arg(long, default_value_t = 64)]
    pub(crate) batch: usize,
    /// Sampling vocabulary.
    #[arg(long, default_value_t = 131072)]
    pub(crate) vocab: u32,
    /// Measure only these staging configurations (unverified DMA alone,
    /// unverified and verified loads), each `THREADS:SLOT_MIB:SLOTS:STREAMS:MOVER`
    /// with MOVER `ce` or `kernel`, e.g. `8:8:3:1:ce`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) configs: Vec<String>,
    /// Only the sampling part.
    #[arg(long)]
    pub(crate) sampling_only: bool,
    /// Only the load part.
    #[arg(long)]
    pub(crate) load_only: bool,
    #[command(flatten)]
    pub(crate) pool: Pool,
}

pub fn run(args: Args) -> Result<()> {
    match args.command {
        Cmd::Info => info(),
        Cmd::Load(a) => crate::gpu_load::load(a),
        Cmd::BenchVerify(a) => crate::gpu_verify_bench::run(a),
        Cmd::BenchSampling(a) => crate::gpu_bench_sampling::run(a),
        Cmd::Bench(a) => bench(a),
    }
}

fn info() -> Result<()> {
    let (dmaj, dmin) = cnse_kernels::device::driver_version()?;
    println!("CUDA driver {dmaj}.{dmin}");
    match cnse_kernels::device::nvrtc_version() {
        Ok((maj, min)) => println!("NVRTC {maj}.{min}"),
        Err(e) => println!("NVRTC: {e}"),
    }
    let devices = cnse_kernels::device::devices()?;
    if devices.is_empty() {
        bail!("the CUDA driver reports no devices");
    }
    for d in devices {
        println!(
            "device {}: {} (sm_{}{}), {:.1} GiB ({:.1} GiB free), {} SMs, L2 {} MiB, {} copy engines, bus {}-bit, PCI {}",
            d.ordinal,
            d.name,
            d.compute_capability.0,
            d.compute_capability.1,
            d.total_bytes as f64 / (1u64 << 30) as f64,
            d.free_bytes as f64 / (1u64 << 30) as f64,
            d.multiprocessors,
            d.l2_bytes >> 20,
            d.copy_engines,
            d.memory_bus_bits,
            d.pci
        );
    }
    Ok(())
}

pub(crate) fn gbps(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s / 1e9
}

// ---- bench ---------------------------------------------------------------------

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Writes `bytes` of pseudo-random data (xorshift, one stream per thread).
pub(crate) fn make_blob(path: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::create(path).with_context(|| format!("create {}", path.display()))?;
    let piece = 64u64 << 20;
    let pieces = bytes.div_ceil(piece);
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(16) as u64;
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for t in 0..threads {
            let file = &file;
            handles.push(s.spawn(move || -> Result<()> {
                let mut buf = vec![0u64; (piece / 8) as usize];
                let mut p = t;
                while p < pieces {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (p + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                    for w in buf.iter_mut() {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        *w = x;
                    }
                    let len = piece.min(bytes - p * piece) as usize;
                    // SAFETY: viewing an initialised u64 buffer as bytes.
                    let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, buf.len() * 8) };
                    file.write_all_at(&raw[..len], p * piece)?;
                    p += threads;
                }
                Ok(())
            }));
        }
        for h in handles {
            h.join().map_err(|_| anyhow::anyhow!("blob writer panicked"))??;
        }
        Ok(())
    })?;
    file.sync_all().context("sync blob")?;
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    cnse_kernels::device::devices()?; // fails early, with the clear message, without a driver
    println!(
        "machine: {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        device_line(a.device)?
    );
    if !a.sampling_only {
        crate::gpu_bench_load::bench_load(&a)?;
    }
    if !a.load_only {
        crate::gpu_bench_sampling::bench_sampling(a.device, a.batch, a.vocab, 0, 3, true)?;
    }
    Ok(())
}

pub(crate) fn device_line(ordinal: usize) -> Result<String> {
    let d = cnse_kernels::device::devices()?
        .into_iter()
        .find(|d| d.ordinal == ordinal)
        .with_context(|| format!("no CUDA device {ordinal}"))?;
    let (maj, min) = cnse_kernels::device::driver_version()?;
    Ok(format!(
        "GPU {} {}: {} (sm_{}{}), driver {maj}.{min}",
        d.ordinal, d.pci, d.name, d.compute_capability.0, d.compute_capability.1
    ))
}
