//! `cnse-dp gpu load`: one model from the store (or a file) into GPU memory,
//! every byte checked on the host (`--verify cpu`) or on the GPU (`--verify
//! gpu`), with the time of each phase.
//!
//! The model story, one stage per call in `load`:
//! resolve digest → manifest → mmap → pinned buffer → GPU → verify SHA-256
//! (per chunk on the host while staging, or per leaf on the GPU after DMA).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use cnse_kernels::model::{load_from_store, Checked, LoadedModel, ModelLoad, Verify};
use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::verify_gpu::GpuVerifier;
use cnse_kernels::{
    DeviceBuffer, GpuVerifyOptions, LeafSpec, LoadOptions, LoadReport, ResidentOptions, SourceMode, Streamer,
};

use crate::gpu::{gbps, Pool, SourceArg};

/// Where the SHA-256 of a load is computed.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum VerifyArg {
    /// The GPU where the manifest has leaf digests, else the host.
    Auto,
    /// Host threads hash each chunk while staging it.
    Cpu,
    /// The GPU hashes every leaf after its DMA (needs leaf digests:
    /// `store upgrade` adds them to old manifests).
    Gpu,
}

#[derive(clap::Args)]
pub(crate) struct LoadArgs {
    /// `sha256:HEX` or `name:tag` of a blob in the store.
    #[arg(required_unless_present = "file", conflicts_with = "file")]
    target: Option<String>,
    /// Store directory (default: the user's data dir).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Load a file from outside the store: its chunk and leaf digests are
    /// computed first, so this checks the path, not the file's integrity.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Chunk size for --file, MiB.
    #[arg(long, default_value_t = 16)]
    chunk_mib: u64,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// Where every byte is checked.
    #[arg(long, value_enum, default_value = "auto")]
    verify: VerifyArg,
    /// Skip verification (for measurement only).
    #[arg(long, conflicts_with = "verify")]
    no_verify: bool,
    /// How workers read the blob.
    #[arg(long, value_enum, default_value = "auto")]
    source: SourceArg,
    /// Copy the device bytes back afterwards and compare them with the file.
    #[arg(long)]
    check: bool,
    /// Read the parts of the blob that are not in the page cache in file
    /// order on one thread ahead of the workers (cold loads: the disk sees
    /// one sequential reader). Not the default: on the device machine's
    /// virtual disk it was no consistent gain (docs/GPU.md).
    #[arg(long)]
    readahead: bool,
    /// Keep the blob's page cache registered (page-locked) for later loads
    /// of this process, within a budget of this many GiB: the first load
    /// registers the blob, later ones only DMA from it (1-2 host threads,
    /// verified on the GPU). Residency ends with the process; a one-shot
    /// load pays the registration, so use it with --repeat or in a
    /// long-lived process (docs/STORE.md, "Resident blobs").
    #[arg(long)]
    resident_gib: Option<u64>,
    /// Load this many times in this process (the first load of a resident
    /// blob registers it; the rest find it resident).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    repeat: u32,
    #[command(flatten)]
    pool: Pool,
}

fn print_phases(r: &LoadReport, how: &str) {
    println!("  open + map          {:>9.4} s", r.open_s);
    if r.register_s > 0.0 {
        println!(
            "    of which register {:>9.4} s  {:>6.2} GB/s  (made resident: later loads skip it)",
            r.register_s,
            gbps(r.bytes, r.register_s)
        );
    }
    println!("  device alloc        {:>9.4} s", r.device_alloc_s);
    println!(
        "  copy + DMA + check  {:>9.4} s  {:>6.2} GB/s  ({} threads, {} source, {}, {how})",
        r.stream_s,
        gbps(r.bytes, r.stream_s),
        r.threads,
        r.source,
        r.mover,
    );
    println!("  total               {:>9.4} s  {:>6.2} GB/s", r.total_s, r.gb_per_s());
}

pub(crate) fn load(a: LoadArgs) -> Result<()> {
    let config = a.pool.config();
    let verify = match (a.no_verify, a.verify) {
        (true, _) => Verify::Off,
        (false, VerifyArg::Auto) => Verify::Auto,
        (false, VerifyArg::Cpu) => Verify::Cpu,
        (false, VerifyArg::Gpu) => Verify::Gpu,
    };
    let source = match a.resident_gib {
        Some(_) if matches!(verify, Verify::Cpu) => {
            bail!("--resident-gib: resident blobs are verified on the GPU (--verify gpu or auto) or not at all")
        }
        Some(_) => SourceMode::Resident,
        None => a.source.pick(),
    };
    let how = ModelLoad {
        verify,
        source,
        readahead: a.readahead,
    };
    let mut streamer = Streamer::new(a.device, config).context("set up the GPU streamer")?;
    if let Some(gib) = a.resident_gib {
        let budget_bytes = gib.checked_mul(1 << 30).context("--resident-gib is too large")?;
        streamer.set_resident(ResidentOptions {
            budget_bytes,
            ..Default::default()
        })?;
    }
    let store = match &a.file {
        Some(_) => None,
        None => Some(
            cnse_store::Store::open(a.store.clone().unwrap_or_else(cnse_store::Store::default_dir))
                .context("open store")?,
        ),
    };
    let one = |streamer: &mut Streamer| match (&a.file, &store) {
        (Some(path), _) => load_file(path, a.chunk_mib << 20, streamer, how),
        (None, Some(store)) => {
            let target = a.target.as_deref().expect("clap requires target or --file");
            load_from_store(store, target, streamer, how).context("load to GPU")
        }
        (None, None) => unreachable!("a store is opened when no --file is given"),
    };
    for i in 1..a.repeat {
        let m = one(&mut streamer)?;
        let r = &m.report;
        println!(
            "load {i} of {}: total {:.4} s, {:.2} GB/s (copy {:.2} GB/s, register {:.4} s)",
            a.repeat,
            r.total_s,
            r.gb_per_s(),
            gbps(r.bytes, r.stream_s),
            r.register_s
        );
    }
    let m = one(&mut streamer)?;
    if a.repeat > 1 {
        println!("load {} of {}:", a.repeat, a.repeat);
    }
    let r = &m.report;
    println!(
        "gpu load {}: {} bytes, {} chunks of {} MiB -> device {}",
        m.label,
        m.blob.size_bytes,
        m.chunks,
        m.chunk_bytes >> 20,
        a.device
    );
    println!("  resolve + manifest  {:>9.4} s", m.resolve_s);
    println!(
        "  staging setup       {:>9.4} s  ({} threads x {} x {} MiB pinned, {} streams{}; once per process)",
        streamer.pool_alloc_s(),
        config.threads,
        config.slots_per_thread,
        config.slot_bytes >> 20,
        config.streams,
        if config.write_combined { ", write-combined" } else { "" }
    );
    let how = match m.checked {
        Checked::Gpu { leaf_bytes } => format!("every {} KiB leaf verified on the GPU", leaf_bytes >> 10),
        Checked::Host => "every chunk verified on the host".to_string(),
        Checked::No => "NOT verified".to_string(),
    };
    print_phases(r, &how);
    if a.check {
        let t = Instant::now();
        compare_with_file(&m.blob.buffer, &m.path)?;
        println!(
            "  check (copy back)   {:>9.4} s  device bytes equal the file",
            t.elapsed().as_secs_f64()
        );
    }
    if m.blob.verified {
        println!(
            "verified sha256:{} ({} bytes on device {}, {})",
            hex(&m.blob.digest),
            m.blob.size_bytes,
            a.device,
            if matches!(m.checked, Checked::Gpu { .. }) {
                "checked on the GPU"
            } else {
                "checked on the host"
            }
        );
        if a.resident_gib.is_some() {
            let s = streamer.resident_stats();
            println!(
                "resident: {} blob(s), {} bytes registered; {} load(s) found it resident, {} registered it \
                 ({} pieces); residency ends with this process",
                s.entries, s.resident_bytes, s.hits, s.misses, s.registrations
            );
        }
    } else {
        println!(
            "loaded {} bytes on device {} WITHOUT verification (--no-verify)",
            m.blob.size_bytes, a.device
        );
    }
    Ok(())
}

/// A file from outside the store: its chunk (and, for the GPU, leaf)
/// digests are computed first, so this checks the path, not the file.
fn load_file(path: &Path, chunk_bytes: u64, streamer: &mut Streamer, how: ModelLoad) -> Result<LoadedModel> {
    let t_resolve = Instant::now();
    let threads = streamer.config().threads;
    let leaf_bytes = cnse_store::default_leaf_bytes(chunk_bytes);
    let on_gpu = matches!(how.verify, Verify::Gpu);
    // For the GPU: leaves and chunk digests as `store put` writes them
    // (format 3, roots over the leaves); for the host, plain chunk digests.
    let (owned, file_leaves) = if on_gpu {
        OwnedSpec::from_file_with_leaves(path, chunk_bytes, leaf_bytes, threads)
    } else {
        OwnedSpec::from_file(path, chunk_bytes, threads).map(|o| (o, Vec::new()))
    }
    .with_context(|| format!("hash {}", path.display()))?;
    let spec = owned.as_spec();
    let resolve_s = t_resolve.elapsed().as_secs_f64();
    let opts = LoadOptions::new(
        !on_gpu && how.verify != Verify::Off,
        how.source,
        cnse_kernels::model::load_threads(streamer, how.source),
    );
    let readahead = how
        .readahead
        .then(|| cnse_kernels::Readahead::start(spec.path, u64::MAX))
        .transpose()?;
    let (blob, report, checked) = if on_gpu {
        let leaves = LeafSpec {
            leaf_bytes,
            digests: &file_leaves,
        };
        let verifier = GpuVerifier::new(streamer).context("compile the GPU SHA-256 kernel")?;
        let (b, r) = verifier
            .load_after(
                streamer,
                &spec,
                &leaves,
                opts,
                GpuVerifyOptions::default(),
                readahead.as_ref(),
            )
            .context("load to GPU")?;
        (b, r, Checked::Gpu { leaf_bytes })
    } else {
        let (b, r) = match &readahead {
            Some(ra) => streamer.load_after(&spec, opts, ra),
            None => streamer.load(&spec, opts),
        }
        .context("load to GPU")?;
        let checked = if r.verified { Checked::Host } else { Checked::No };
        (b, r, checked)
    };
    Ok(LoadedModel {
        blob,
        report,
        checked,
        label: format!("{} (file; digests computed here)", path.display()),
        chunks: owned.chunk_digests.len(),
        chunk_bytes: owned.chunk_bytes,
        path: owned.path.clone(),
        resolve_s,
    })
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn compare_with_file(buf: &DeviceBuffer, path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let step = 64 << 20;
    let mut host = vec![0u8; step];
    let mut dev = vec![0u8; step];
    let mut off = 0usize;
    while off < buf.len() {
        let n = step.min(buf.len() - off);
        f.read_exact(&mut host[..n])
            .with_context(|| format!("read {}", path.display()))?;
        buf.copy_to_host(off, &mut dev[..n])?;
        if host[..n] != dev[..n] {
            let i = (0..n).find(|&i| host[i] != dev[i]).unwrap_or(0);
            bail!("device bytes differ from {} at offset {}", path.display(), off + i);
        }
        off += n;
    }
    Ok(())
}
