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
use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::verify_gpu::GpuVerifier;
use cnse_kernels::{BlobSpec, DeviceBuffer, GpuVerifyOptions, LeafSpec, LoadOptions, LoadReport, Streamer};

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
    /// Read the blob in file order on one thread ahead of the workers
    /// (cold loads: the disk sees one sequential reader).
    #[arg(long)]
    readahead: bool,
    #[command(flatten)]
    pool: Pool,
}

fn print_phases(r: &LoadReport, how: &str) {
    println!("  open + map          {:>9.4} s", r.open_s);
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

    let t_resolve = Instant::now();
    // Keeps the store's shared lock (no rm/gc under our map) and the
    // manifest's bytes for the duration of the load.
    let (_lock, manifest, owned, label, file_leaves);
    let mut leaves: Option<LeafSpec> = None;
    let spec: BlobSpec = if let Some(path) = &a.file {
        owned = OwnedSpec::from_file(path, a.chunk_mib << 20, config.threads)
            .with_context(|| format!("hash {}", path.display()))?;
        label = format!("{} (file; digests computed here)", path.display());
        if a.verify == VerifyArg::Gpu {
            let leaf_bytes = cnse_store::default_leaf_bytes(owned.chunk_bytes);
            // SAFETY: the file is only read; a truncation by another process
            // while hashing would end this process (SIGBUS), not corrupt it.
            let map = unsafe { cnse_store::map_file(path) }?;
            file_leaves = cnse_store::leaf_digests_parallel(&map, leaf_bytes, config.threads);
            leaves = Some(LeafSpec {
                leaf_bytes,
                digests: &file_leaves,
            });
        }
        owned.as_spec()
    } else {
        let target = a.target.as_deref().expect("clap requires target or --file");
        let store = cnse_store::Store::open(a.store.clone().unwrap_or_else(cnse_store::Store::default_dir))
            .context("open store")?;
        _lock = store.lock(cnse_store::LockKind::Shared).context("lock store")?;
        let digest = store.resolve(target).with_context(|| format!("resolve {target}"))?;
        manifest = store
            .manifest(&digest)
            .with_context(|| format!("manifest of {digest}"))?;
        label = format!("{target} = {digest}");
        leaves = manifest
            .leaves()
            .map(|(leaf_bytes, digests)| LeafSpec { leaf_bytes, digests });
        owned = OwnedSpec {
            path: store.blob_path(&digest),
            size_bytes: manifest.size_bytes(),
            chunk_bytes: manifest.chunk_bytes(),
            chunk_digests: manifest.chunk_digests().to_vec(),
            digest: digest.0,
        };
        owned.as_spec()
    };
    let resolve_s = t_resolve.elapsed().as_secs_f64();
    let on_gpu = match (a.no_verify, a.verify, &leaves) {
        (true, _, _) => false,
        (false, VerifyArg::Cpu, _) => false,
        (false, VerifyArg::Auto, l) => l.is_some(),
        (false, VerifyArg::Gpu, Some(_)) => true,
        (false, VerifyArg::Gpu, None) => {
            bail!("--verify gpu: the manifest has no leaf digests (format 1); run `cnse-dp store upgrade {label}` first, or use --verify cpu")
        }
    };

    let mut streamer = Streamer::new(a.device, config).context("set up the GPU streamer")?;
    println!(
        "gpu load {label}: {} bytes, {} chunks of {} MiB -> device {}",
        spec.size_bytes,
        spec.chunk_digests.len(),
        spec.chunk_bytes >> 20,
        a.device
    );
    println!("  resolve + manifest  {resolve_s:>9.4} s");
    println!(
        "  staging setup       {:>9.4} s  ({} threads x {} x {} MiB pinned, {} streams{}; once per process)",
        streamer.pool_alloc_s(),
        config.threads,
        config.slots_per_thread,
        config.slot_bytes >> 20,
        config.streams,
        if config.write_combined { ", write-combined" } else { "" }
    );
    let opts = LoadOptions::new(!a.no_verify && !on_gpu, a.source.pick(), config.threads);
    let readahead = a
        .readahead
        .then(|| cnse_kernels::Readahead::start(spec.path, u64::MAX))
        .transpose()?;
    let (blob, report, how) = match (on_gpu, leaves) {
        (true, Some(l)) => {
            let verifier = GpuVerifier::new(&streamer).context("compile the GPU SHA-256 kernel")?;
            let (b, r) = verifier
                .load_after(
                    &mut streamer,
                    &spec,
                    &l,
                    opts,
                    GpuVerifyOptions::default(),
                    readahead.as_ref(),
                )
                .context("load to GPU")?;
            let how = format!("every {} KiB leaf verified on the GPU", l.leaf_bytes >> 10);
            (b, r, how)
        }
        _ => {
            let (b, r) = match &readahead {
                Some(ra) => streamer.load_after(&spec, opts, ra),
                None => streamer.load(&spec, opts),
            }
            .context("load to GPU")?;
            let how = if r.verified {
                "every chunk verified on the host"
            } else {
                "NOT verified"
            };
            (b, r, how.to_string())
        }
    };
    print_phases(&report, &how);
    if a.check {
        let t = Instant::now();
        compare_with_file(&blob.buffer, spec.path)?;
        println!(
            "  check (copy back)   {:>9.4} s  device bytes equal the file",
            t.elapsed().as_secs_f64()
        );
    }
    if blob.verified {
        println!(
            "verified sha256:{} ({} bytes on device {}, {})",
            hex(&blob.digest),
            blob.size_bytes,
            a.device,
            if on_gpu {
                "checked on the GPU"
            } else {
                "checked on the host"
            }
        );
    } else {
        println!(
            "loaded {} bytes on device {} WITHOUT verification (--no-verify)",
            blob.size_bytes, a.device
        );
    }
    Ok(())
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
