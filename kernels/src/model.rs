//! The model story as one library call: a store name to device memory.
//!
//! resolve digest → manifest → mmap → pinned staging → GPU → SHA-256 checked
//! per chunk on the host while staging, or per leaf on the GPU after the
//! copies. The store's shared lock is held for the whole load, so `rm` and
//! `gc` cannot take the blob from under the map. The CLI (`cnse-dp gpu
//! load`) only parses arguments and prints what this returns.

use std::time::Instant;

use cnse_store::{LockKind, Store};

use crate::stream::{LoadOptions, LoadReport, OwnedSpec, SourceMode, Streamer};
use crate::verify_gpu::{GpuVerifier, GpuVerifyOptions, LeafSpec};
use crate::{DeviceBlob, KernelError, Readahead};

/// Where a load's SHA-256 is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// The GPU where the manifest binds leaf digests to its chunk digests
    /// (format 3), else the host.
    Auto,
    /// Host threads hash each chunk while staging it.
    Cpu,
    /// The GPU hashes every leaf after its copy (the manifest must be
    /// format 3: `cnse-dp store upgrade` rewrites older ones).
    Gpu,
    /// No check at all (measurement only).
    Off,
}

/// How one model load runs.
#[derive(Clone, Copy, Debug)]
pub struct ModelLoad {
    pub verify: Verify,
    pub source: SourceMode,
    /// One thread reads what of the blob is not in the page cache, in file
    /// order, ahead of the workers (cold loads: the disk sees one
    /// sequential reader; `gpu load --readahead`).
    pub readahead: bool,
}

/// Where a load's bytes were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Every chunk hashed on the host while staging.
    Host,
    /// Every leaf of `leaf_bytes` hashed on the GPU after its copy.
    Gpu { leaf_bytes: u64 },
    /// Not at all (`Verify::Off`).
    No,
}

/// A model in device memory.
pub struct LoadedModel {
    pub blob: DeviceBlob,
    pub report: LoadReport,
    pub checked: Checked,
    /// `target = sha256:HEX`.
    pub label: String,
    /// Chunks of the manifest and their size.
    pub chunks: usize,
    pub chunk_bytes: u64,
    /// The blob file the bytes came from (for a read-back check).
    pub path: std::path::PathBuf,
    /// Seconds spent resolving the name and reading the manifest.
    pub resolve_s: f64,
}

/// Workers of a load: every worker for the staging sources; at most
/// `RESIDENT_THREADS` for a resident blob, where threads only queue DMA.
pub fn load_threads(streamer: &Streamer, source: SourceMode) -> usize {
    let all = streamer.config().threads;
    if source == SourceMode::Resident {
        all.min(RESIDENT_THREADS)
    } else {
        all
    }
}

/// Threads that queue the copies of a resident blob's load.
pub const RESIDENT_THREADS: usize = 2;

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error(transparent)]
    Store(#[from] cnse_store::StoreError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("--verify gpu: the manifest of {label} is format {format}, whose chunk digests are not derived from leaf digests; run `cnse-dp store upgrade {label}` (format 3) first, or verify on the host")]
    NoLeaves { label: String, format: u32 },
}

/// Loads `target` (`sha256:HEX` or `name:tag`) from `store` into the
/// streamer's device, checked as `how.verify` says.
pub fn load_from_store(
    store: &Store,
    target: &str,
    streamer: &mut Streamer,
    how: ModelLoad,
) -> Result<LoadedModel, ModelLoadError> {
    let t_resolve = Instant::now();
    let _lock = store.lock(LockKind::Shared)?;
    let digest = store.resolve(target)?;
    let manifest = store.manifest(&digest)?;
    let label = format!("{target} = {digest}");
    // Only format 3 binds the leaves to the chunk digests (Merkle roots);
    // format 2 leaves are not used for verification.
    let leaves = manifest
        .leaves()
        .filter(|_| manifest.chunk_scheme() != cnse_store::ChunkScheme::Plain)
        .map(|(leaf_bytes, digests)| LeafSpec { leaf_bytes, digests });
    let owned = OwnedSpec {
        path: store.blob_path(&digest),
        size_bytes: manifest.size_bytes(),
        chunk_bytes: manifest.chunk_bytes(),
        chunk_digests: manifest.chunk_digests().to_vec(),
        scheme: manifest.chunk_scheme(),
        digest: digest.0,
    };
    let spec = owned.as_spec();
    let resolve_s = t_resolve.elapsed().as_secs_f64();
    let on_gpu = match (how.verify, &leaves) {
        (Verify::Off | Verify::Cpu, _) => None,
        (Verify::Auto, l) => l.as_ref(),
        (Verify::Gpu, Some(l)) => Some(l),
        (Verify::Gpu, None) => {
            return Err(ModelLoadError::NoLeaves {
                label,
                format: manifest.format(),
            })
        }
    };
    let opts = LoadOptions::new(
        how.verify != Verify::Off && on_gpu.is_none(),
        how.source,
        load_threads(streamer, how.source),
    );
    let readahead = how
        .readahead
        .then(|| Readahead::start(spec.path, u64::MAX))
        .transpose()?;
    let (blob, report, checked) = match on_gpu {
        Some(l) => {
            let verifier = GpuVerifier::new(streamer)?;
            let (b, r) = verifier.load_after(
                streamer,
                &spec,
                l,
                opts,
                GpuVerifyOptions::default(),
                readahead.as_ref(),
            )?;
            (
                b,
                r,
                Checked::Gpu {
                    leaf_bytes: l.leaf_bytes,
                },
            )
        }
        None => {
            let (b, r) = match &readahead {
                Some(ra) => streamer.load_after(&spec, opts, ra)?,
                None => streamer.load(&spec, opts)?,
            };
            let checked = if r.verified { Checked::Host } else { Checked::No };
            (b, r, checked)
        }
    };
    Ok(LoadedModel {
        blob,
        report,
        checked,
        label,
        chunks: owned.chunk_digests.len(),
        chunk_bytes: owned.chunk_bytes,
        path: owned.path.clone(),
        resolve_s,
    })
}
