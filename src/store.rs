//! `cnse-dp store`: the content-addressed model store from the command line.
//! Every subcommand is one call into `cnse_store`; this file parses options,
//! draws progress and prints (human text, or one JSON object with `--json`).

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{bail, Context, Result};
use cnse_store::progress::Progress;
use cnse_store::{Digest, Filer, PullOptions, PullTarget, PutOptions, RefName, SourceFile, Store, VerifyReport};
use serde_json::{json, Value};

mod bench;
mod units;
mod upgrade;

pub(crate) use units::parse_bytes;
use units::{ago, unix_s, utc};

#[derive(clap::Args)]
pub struct Args {
    /// Store directory [default: $XDG_DATA_HOME/cnse-dp/store or ~/.local/share/cnse-dp/store].
    #[arg(long, global = true, value_name = "DIR")]
    store: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Add a file; prints its digest (sha256:HEX) on the last line.
    Put {
        file: PathBuf,
        /// Also name it NAME:TAG (TAG defaults to `latest`).
        #[arg(long, value_name = "NAME:TAG")]
        name: Option<String>,
        /// Pin the name: gc never evicts what a pinned name holds.
        #[arg(long, requires = "name")]
        pin: bool,
        /// Bytes per verification chunk (a multiple of 4096).
        #[arg(long, value_parser = parse_bytes, default_value = "16MiB")]
        chunk_bytes: u64,
        /// Bytes per leaf digest (a power of two dividing the chunk) [default: 64KiB].
        #[arg(long, value_parser = parse_bytes)]
        leaf_bytes: Option<u64>,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Copy a verified blob out of the store.
    Get {
        target: String,
        /// Where to write (`-` for standard output).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Check blobs against their manifests; exits 0 only when all are intact.
    Verify {
        targets: Vec<String>,
        /// Every blob in the store.
        #[arg(long, conflicts_with = "targets")]
        all: bool,
        /// Also recompute the whole-file digest (one sequential pass).
        #[arg(long)]
        full: bool,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// List blobs with their names, sizes and last use.
    Ls,
    /// Remove a name (and its blob when no other name holds it) or a blob.
    Rm {
        target: String,
        /// Remove a blob even when names point at it (they go too).
        #[arg(long)]
        force: bool,
        /// Remove only the name, keep the blob.
        #[arg(long)]
        keep_blob: bool,
    },
    /// Remove leftovers; with --max-bytes evict least recently used blobs.
    Gc {
        #[arg(long, value_parser = parse_bytes)]
        max_bytes: Option<u64>,
        /// Also drop resumable partial pulls.
        #[arg(long)]
        partials: bool,
    },
    /// Name a blob NAME:TAG.
    Tag {
        target: String,
        name: String,
        #[arg(long)]
        pin: bool,
    },
    /// Pin a name so gc never evicts its blob.
    Pin { name: String },
    /// Unpin a name.
    Unpin { name: String },
    /// Upload a blob, its manifest and optionally a name to an HTTP filer.
    Push {
        target: String,
        #[arg(long, value_name = "URL")]
        filer: String,
        /// Name on the filer [default: TARGET when it is a name].
        #[arg(long, value_name = "NAME:TAG")]
        name: Option<String>,
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Download a blob (by digest or filer name), verifying each chunk; resumes.
    Pull {
        target: String,
        #[arg(long, value_name = "URL")]
        filer: String,
        /// Local name [default: TARGET when it is a name].
        #[arg(long, value_name = "NAME:TAG")]
        name: Option<String>,
        #[arg(long)]
        pin: bool,
        /// Bytes per second (e.g. 50MiB).
        #[arg(long, value_parser = parse_bytes)]
        limit_rate: Option<u64>,
    },
    /// Give old manifests leaf digests (for GPU verification), after checking every chunk.
    Upgrade(upgrade::Args),
    /// Show a blob's manifest and GGUF metadata.
    Inspect { target: String },
    /// Measure hashing, put and parallel verify against openssl and cp+sync.
    Bench(bench::Args),
}

pub fn run(args: Args) -> Result<()> {
    let dir = args.store.clone().unwrap_or_else(Store::default_dir);
    if let Cmd::Bench(b) = args.command {
        return bench::run(b, args.json);
    }
    let store = Store::open(&dir).with_context(|| format!("open store {}", dir.display()))?;
    let out = Out { json: args.json };
    match args.command {
        Cmd::Put {
            file,
            name,
            pin,
            chunk_bytes,
            leaf_bytes,
            threads,
        } => {
            let name = name.map(|n| n.parse::<RefName>()).transpose()?;
            // SAFETY: a file is put while nobody truncates it; if someone does,
            // the process dies of SIGBUS and the store holds only a temporary
            // file that `gc` removes: the store stays consistent either way.
            let src = unsafe { SourceFile::open(&file) }?;
            let bar = Progress::new(src.len(), "put");
            let opts = PutOptions {
                name: name.clone(),
                pin,
                chunk_bytes,
                leaf_bytes,
                threads: threads_or_default(threads),
            };
            let o = store
                .put(&src, &opts, &|n| bar.inc(n))
                .with_context(|| format!("put {}", file.display()))?;
            bar.finish();
            out.emit(
                json!({"digest": o.digest.to_string(), "size_bytes": o.size_bytes, "existed": o.existed,
                       "name": name.map(|n| n.to_string()), "pinned": pin}),
                || {
                    let what = if o.existed { "already stored" } else { "stored" };
                    let named = name_suffix(&opts.name);
                    format!(
                        "{what} {} ({} bytes){named}\n{}",
                        file.display(),
                        o.size_bytes,
                        o.digest
                    )
                },
            );
        }
        Cmd::Get {
            target,
            output,
            threads,
        } => {
            let d = store.resolve(&target)?;
            let size = store.manifest(&d)?.size_bytes();
            let bar = Progress::new(size, "verify");
            let threads = threads_or_default(threads);
            if output.as_os_str() == "-" {
                let blob = store
                    .open_verified(&d, threads, &|n| bar.inc(n))
                    .with_context(|| format!("get {target}"))?;
                bar.finish();
                let mut stdout = std::io::stdout().lock();
                std::io::Write::write_all(&mut stdout, blob.bytes()).context("write to stdout")?;
                std::io::Write::flush(&mut stdout).context("write to stdout")?;
                return Ok(());
            }
            let n = store
                .get(&d, &output, threads, &|n| bar.inc(n))
                .with_context(|| format!("get {target}"))?;
            bar.finish();
            out.emit(
                json!({"digest": d.to_string(), "size_bytes": n, "output": output}),
                || format!("wrote {} ({n} bytes, verified) to {}", d, output.display()),
            );
        }
        Cmd::Verify {
            targets,
            all,
            full,
            threads,
        } => {
            let digests: Vec<Digest> = if all {
                let (d, stray) = store.blob_digests()?;
                if !stray.is_empty() {
                    bail!("stray file in the blob directory: {}", stray[0].display());
                }
                d
            } else if targets.is_empty() {
                bail!("name the blobs to verify (digest or NAME:TAG), or pass --all");
            } else {
                targets.iter().map(|t| store.resolve(t)).collect::<Result<_, _>>()?
            };
            let threads = threads_or_default(threads);
            let mut reports = Vec::new();
            for d in &digests {
                let size = std::fs::metadata(store.blob_path(d)).map(|m| m.len()).unwrap_or(0);
                let bar = Progress::new(size, "verify");
                reports.push(store.verify(d, threads, full, &|n| bar.inc(n))?);
                bar.finish();
            }
            let bad = reports.iter().filter(|r| !r.ok()).count();
            out.emit(
                json!({"ok": bad == 0, "checked": reports.len(), "bad": bad,
                       "blobs": reports.iter().map(verify_json).collect::<Vec<_>>()}),
                || match reports.len() {
                    0 => "no blobs to check".to_string(),
                    _ => reports.iter().map(verify_text).collect::<Vec<_>>().join("\n"),
                },
            );
            if bad > 0 {
                bail!("{bad} of {} blobs failed verification", reports.len());
            }
        }
        Cmd::Ls => {
            let entries = store.list()?;
            let now = SystemTime::now();
            out.emit(
                Value::Array(
                    entries
                        .iter()
                        .map(|e| {
                            json!({"digest": e.digest.to_string(), "size_bytes": e.size_bytes,
                               "last_used_unix_s": unix_s(e.last_used), "name": e.name,
                               "refs": e.refs.iter().map(|r| json!({"name": r.name.to_string(), "pinned": r.pinned})).collect::<Vec<_>>(),
                               "architecture": e.architecture, "quantization": e.quantization})
                        })
                        .collect(),
                ),
                || {
                    let mut s = format!("{:<20} {:>14}  {:<9} {:<24} REFS", "DIGEST", "BYTES", "USED", "MODEL");
                    for e in &entries {
                        let refs: Vec<String> = e
                            .refs
                            .iter()
                            .map(|r| format!("{}{}", r.name, if r.pinned { " (pinned)" } else { "" }))
                            .collect();
                        let model = match (&e.architecture, &e.quantization) {
                            (Some(a), Some(q)) => format!("{a} {q}"),
                            (Some(a), None) => a.clone(),
                            _ => e.name.clone().unwrap_or_default(),
                        };
                        s.push_str(&format!(
                            "\n{:<20} {:>14}  {:<9} {:<24} {}",
                            &e.digest.to_string()[..19],
                            e.size_bytes,
                            ago(now, e.last_used),
                            model,
                            refs.join(", ")
                        ));
                    }
                    s
                },
            );
        }
        Cmd::Rm {
            target,
            force,
            keep_blob,
        } => {
            let o = store.rm(&target, force, keep_blob)?;
            out.emit(
                json!({"refs_removed": o.refs_removed.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
                       "blob_removed": o.blob_removed.map(|d| d.to_string())}),
                || {
                    let mut lines: Vec<String> = o.refs_removed.iter().map(|r| format!("removed name {r}")).collect();
                    if let Some(d) = o.blob_removed {
                        lines.push(format!("removed blob {d}"));
                    }
                    lines.join("\n")
                },
            );
        }
        Cmd::Gc { max_bytes, partials } => {
            let r = store.gc(max_bytes, partials)?;
            out.emit(
                json!({"bytes_before": r.bytes_before, "bytes_after": r.bytes_after,
                       "evicted": r.evicted.iter().map(|(d, n, refs)| json!({"digest": d.to_string(), "size_bytes": n,
                            "refs": refs.iter().map(|r| r.to_string()).collect::<Vec<_>>()})).collect::<Vec<_>>(),
                       "temp_files_removed": r.temp_files_removed, "orphan_manifests_removed": r.orphan_manifests_removed,
                       "over_budget_pinned_bytes": r.pinned_over_budget_bytes, "partial_bytes_kept": r.partial_bytes_kept}),
                || {
                    let mut lines: Vec<String> = r
                        .evicted
                        .iter()
                        .map(|(d, n, refs)| {
                            let names: Vec<String> = refs.iter().map(|r| r.to_string()).collect();
                            format!("evicted {d} ({n} bytes) {}", names.join(", ")).trim_end().to_string()
                        })
                        .collect();
                    lines.push(format!(
                        "store: {} -> {} bytes; removed {} temporary files, {} orphan manifests",
                        r.bytes_before, r.bytes_after, r.temp_files_removed, r.orphan_manifests_removed
                    ));
                    if r.pinned_over_budget_bytes > 0 {
                        lines.push(format!(
                            "still over budget: pinned blobs hold {} bytes (unpin to let gc evict them)",
                            r.pinned_over_budget_bytes
                        ));
                    }
                    if r.partial_bytes_kept > 0 {
                        lines.push(format!(
                            "kept {} bytes of interrupted pulls (resume with `pull`, or drop with `gc --partials`)",
                            r.partial_bytes_kept
                        ));
                    }
                    lines.join("\n")
                },
            );
        }
        Cmd::Tag { target, name, pin } => {
            let d = store.resolve(&target)?;
            let r: RefName = name.parse()?;
            store.set_ref(&r, &d, pin)?;
            out.emit(
                json!({"name": r.to_string(), "digest": d.to_string(), "pinned": pin}),
                || format!("{r} -> {d}"),
            );
        }
        Cmd::Pin { name } => pin(&store, &out, &name, true)?,
        Cmd::Unpin { name } => pin(&store, &out, &name, false)?,
        Cmd::Push {
            target,
            filer,
            name,
            threads,
        } => {
            let d = store.resolve(&target)?;
            let name = match name {
                Some(n) => Some(n.parse::<RefName>()?),
                None => target
                    .parse::<Digest>()
                    .is_err()
                    .then(|| target.parse::<RefName>())
                    .transpose()?,
            };
            let f = Filer::new(&filer)?;
            let size = store.manifest(&d)?.size_bytes();
            let bar = Progress::new(size, "push");
            let o = f
                .push(&store, &d, name.as_ref(), threads_or_default(threads), &|n| bar.inc(n))
                .with_context(|| format!("push {target} to {filer}"))?;
            bar.finish();
            out.emit(
                json!({"digest": d.to_string(), "size_bytes": o.size_bytes, "uploaded_bytes": o.uploaded_bytes,
                       "blob_existed": o.blob_existed, "name": name.as_ref().map(|n| n.to_string())}),
                || {
                    let what = if o.blob_existed {
                        "already on the filer"
                    } else {
                        "uploaded"
                    };
                    format!("{what}: {d} ({} bytes){}", o.size_bytes, name_suffix(&name))
                },
            );
        }
        Cmd::Pull {
            target,
            filer,
            name,
            pin,
            limit_rate,
        } => {
            let t: PullTarget = target.parse()?;
            let f = Filer::new(&filer)?;
            let opts = PullOptions {
                limit_rate_bytes: limit_rate,
                pin,
                name: name.map(|n| n.parse()).transpose()?,
            };
            // The size is known once the manifest is: fetch it for the bar only on a terminal.
            let size_hint = match (&t, std::io::IsTerminal::is_terminal(&std::io::stderr())) {
                (_, false) => 0,
                (PullTarget::Digest(d), true) => f.manifest(d).map(|m| m.size_bytes()).unwrap_or(0),
                (PullTarget::Ref(r), true) => f
                    .resolve_ref(r)
                    .and_then(|d| f.manifest(&d))
                    .map(|m| m.size_bytes())
                    .unwrap_or(0),
            };
            let bar = Progress::new(size_hint, "pull");
            let o = f
                .pull(&store, &t, &opts, &|n| bar.inc(n))
                .with_context(|| format!("pull {target} from {filer}"))?;
            bar.finish();
            out.emit(
                json!({"digest": o.digest.to_string(), "size_bytes": o.size_bytes, "downloaded_bytes": o.downloaded_bytes,
                       "resumed_bytes": o.resumed_bytes, "refetched_chunks": o.refetched_chunks, "existed": o.existed}),
                || {
                    let mut s = if o.existed {
                        format!("already stored: {}", o.digest)
                    } else {
                        format!("pulled {} ({} bytes, {} downloaded", o.digest, o.size_bytes, o.downloaded_bytes)
                    };
                    if !o.existed {
                        if o.resumed_bytes > 0 {
                            s.push_str(&format!(", resumed after {} verified bytes", o.resumed_bytes));
                        }
                        if !o.refetched_chunks.is_empty() {
                            s.push_str(&format!(", re-fetched bad chunks {:?}", o.refetched_chunks));
                        }
                        s.push(')');
                    }
                    s
                },
            );
        }
        Cmd::Inspect { target } => {
            let d = store.resolve(&target)?;
            let m = store.manifest(&d)?;
            let refs: Vec<_> = store.refs()?.into_iter().filter(|r| r.digest == d).collect();
            let g = m.gguf();
            let gjson = g.as_ref().map(|g| {
                json!({"version": g.version, "architecture": g.architecture, "model_name": g.model_name,
                       "size_label": g.size_label, "quantization": g.quantization, "tensor_count": g.tensor_count,
                       "metadata_count": g.metadata_count, "context_length": g.context_length,
                       "parameter_count": g.parameter_count})
            });
            out.emit(
                json!({"digest": d.to_string(), "size_bytes": m.size_bytes(), "name": m.name(),
                       "created_unix_ms": m.created_unix_ms(), "chunk_bytes": m.chunk_bytes(),
                       "chunk_count": m.chunk_count(), "blob_path": store.blob_path(&d),
                       "leaf_bytes": m.leaves().map(|(l, _)| l), "leaf_count": m.leaves().map(|(_, d)| d.len()),
                       "format": m.format(), "chunk_digest": chunk_def(m.chunk_scheme()),
                       "refs": refs.iter().map(|r| json!({"name": r.name.to_string(), "pinned": r.pinned})).collect::<Vec<_>>(),
                       "chunk_digests": m.chunk_digests().iter().map(|c| cnse_store::hex(c)).collect::<Vec<_>>(),
                       "gguf": gjson}),
                || {
                    let mut lines = vec![
                        ("digest", d.to_string()),
                        ("size", format!("{} bytes", m.size_bytes())),
                        ("name", m.name().to_string()),
                        ("created", utc(m.created_unix_ms() / 1000)),
                        ("format", m.format().to_string()),
                        ("chunks", format!("{} of {} bytes", m.chunk_count(), m.chunk_bytes())),
                        ("chunk digest", chunk_def(m.chunk_scheme()).into()),
                        ("leaves", match m.leaves() {
                            Some((l, d)) => format!("{} of {l} bytes", d.len()),
                            None => "none (format 1 manifest: `store upgrade` adds them)".into(),
                        }),
                        ("path", store.blob_path(&d).display().to_string()),
                    ];
                    for r in &refs {
                        lines.push(("ref", format!("{}{}", r.name, if r.pinned { " (pinned)" } else { "" })));
                    }
                    match &g {
                        None => lines.push(("gguf", "no (not a GGUF v2/v3 file)".into())),
                        Some(g) => {
                            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(not stated)".into());
                            let num = |v: Option<u64>| v.map_or("(not stated)".into(), |v| v.to_string());
                            lines.extend([
                                ("gguf", format!("version {}", g.version)),
                                ("architecture", opt(&g.architecture)),
                                ("model name", opt(&g.model_name)),
                                ("size label", opt(&g.size_label)),
                                ("quantization", opt(&g.quantization)),
                                ("parameters", num(g.parameter_count)),
                                ("context", num(g.context_length)),
                                ("tensors", g.tensor_count.to_string()),
                                ("metadata", format!("{} keys", g.metadata_count)),
                            ]);
                        }
                    }
                    let s = lines.iter().map(|(k, v)| format!("{:<13} {v}", format!("{k}:"))).collect::<Vec<_>>().join("\n");
                    s
                },
            );
        }
        Cmd::Upgrade(a) => upgrade::run(&store, &out, a)?,
        Cmd::Bench(_) => unreachable!("handled before the store is opened"),
    }
    Ok(())
}

fn pin(store: &Store, out: &Out, name: &str, pinned: bool) -> Result<()> {
    let r: RefName = name.parse()?;
    let d = store.set_pinned(&r, pinned)?;
    out.emit(
        json!({"name": r.to_string(), "digest": d.to_string(), "pinned": pinned}),
        || format!("{} {r} ({d})", if pinned { "pinned" } else { "unpinned" }),
    );
    Ok(())
}

struct Out {
    json: bool,
}

impl Out {
    fn emit(&self, v: Value, text: impl FnOnce() -> String) {
        if self.json {
            println!("{v}");
        } else {
            let t = text();
            if !t.is_empty() {
                println!("{t}");
            }
        }
    }
}

fn verify_json(r: &VerifyReport) -> Value {
    json!({"digest": r.digest.to_string(), "ok": r.ok(), "size_bytes": r.size_bytes, "actual_bytes": r.actual_bytes,
           "chunk_bytes": r.chunk_bytes, "bad_chunks": r.bad_chunks, "full_ok": r.full_ok, "problems": r.problems})
}

fn verify_text(r: &VerifyReport) -> String {
    if r.ok() {
        let chunks = if r.chunk_bytes > 0 {
            cnse_store::chunk_count(r.size_bytes, r.chunk_bytes)
        } else {
            0
        };
        let full = if r.full_ok == Some(true) {
            ", whole-file digest ok"
        } else {
            ""
        };
        format!("ok  {} ({} bytes, {chunks} chunks{full})", r.digest, r.size_bytes)
    } else {
        r.problems
            .iter()
            .map(|p| format!("BAD {}: {p}", r.digest))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn name_suffix(n: &Option<RefName>) -> String {
    n.as_ref().map(|n| format!(" as {n}")).unwrap_or_default()
}

fn threads_or_default(t: Option<usize>) -> usize {
    t.filter(|&t| t > 0).unwrap_or_else(cnse_store::default_threads)
}

/// How a manifest defines its chunk digests, in words.
fn chunk_def(scheme: cnse_store::ChunkScheme) -> &'static str {
    match scheme {
        cnse_store::ChunkScheme::Plain => "SHA-256 of the chunk (format 1/2: `store upgrade` makes it format 3)",
        cnse_store::ChunkScheme::Merkle { .. } => "Merkle root over the chunk's leaf digests",
    }
}
