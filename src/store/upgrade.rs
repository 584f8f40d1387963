//! `cnse-dp store upgrade`: rewrites format-1 and format-2 manifests in
//! format 3 (leaf digests bound to the chunk digests by a Merkle tree) so
//! that `gpu load --verify gpu` can check them on the GPU.

use anyhow::{bail, Context, Result};
use cnse_store::{Store, Upgrade};
use serde_json::json;

use super::{parse_bytes, threads_or_default, Out};

#[derive(clap::Args)]
pub struct Args {
    targets: Vec<String>,
    /// Every blob in the store.
    #[arg(long, conflicts_with = "targets")]
    all: bool,
    /// Bytes per leaf (a power of two dividing the chunk) [default: 64KiB].
    #[arg(long, value_parser = parse_bytes)]
    leaf_bytes: Option<u64>,
    #[arg(long)]
    threads: Option<usize>,
}

pub(super) fn run(store: &Store, out: &Out, a: Args) -> Result<()> {
    let digests = if a.all {
        store.blob_digests()?.0
    } else if a.targets.is_empty() {
        bail!("name blobs to upgrade, or pass --all");
    } else {
        a.targets
            .iter()
            .map(|t| store.resolve(t).with_context(|| format!("resolve {t}")))
            .collect::<Result<Vec<_>>>()?
    };
    let threads = threads_or_default(a.threads);
    let mut rows = Vec::with_capacity(digests.len());
    for d in &digests {
        let u = store
            .upgrade(d, a.leaf_bytes, threads)
            .with_context(|| format!("upgrade {d}"))?;
        let (state, from, leaf_bytes) = match u {
            Upgrade::Rewritten { from, leaf_bytes } => ("upgraded", from, leaf_bytes),
            Upgrade::AlreadyCurrent { leaf_bytes } => ("already current", cnse_store::FORMAT_VERSION, leaf_bytes),
        };
        if !out.json {
            println!(
                "{d}: {state} (format {from} -> {}, leaves of {leaf_bytes} bytes)",
                cnse_store::FORMAT_VERSION
            );
        }
        rows.push(json!({"digest": d.to_string(), "state": state, "from_format": from,
                         "format": cnse_store::FORMAT_VERSION, "leaf_bytes": leaf_bytes}));
    }
    out.emit(json!({ "manifests": rows }), String::new);
    Ok(())
}
