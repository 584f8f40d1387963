//! `cnse-dp store bench`: the store's speed next to the tools a user would
//! compare it with, measured side by side in one run on one file:
//! single-stream SHA-256 vs `openssl dgst -sha256`, `put` vs
//! max(openssl, `cp` + `sync`), and parallel verify on 1..N threads.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnse_store::{Digest, PutOptions, Store};
use serde_json::json;

#[derive(clap::Args)]
pub struct Args {
    /// File to measure on [default: a fresh file of --size-mib random bytes].
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Scratch directory (the copy, the bench store, the generated file).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Runs of each measurement; the best and the median are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Verify on 1..=N threads [default: all cores].
    #[arg(long)]
    threads_max: Option<usize>,
}

struct Stats {
    best: Duration,
    median: Duration,
}

fn stats(mut v: Vec<Duration>) -> Stats {
    v.sort();
    Stats {
        best: v[0],
        median: v[v.len() / 2],
    }
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(Duration, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((t.elapsed(), v))
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sync_all() -> Result<()> {
    run_cmd(&mut Command::new("sync")).map(|_| ())
}

/// The 1-minute load average, as /proc/loadavg says it.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// Writes `bytes` of xorshift noise (incompressible, no repeated pages).
fn make_file(path: &Path, bytes: u64) -> Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut left = bytes;
    while left > 0 {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("fsync {}", path.display()))?;
    Ok(())
}

fn warm(path: &Path) -> Result<()> {
    // SAFETY: the benchmark's own files are not truncated while mapped.
    let map = unsafe { cnse_store::map_file(path) }?;
    let mut sum = 0u8;
    for page in map.chunks(4096) {
        sum = sum.wrapping_add(page[0]);
    }
    std::hint::black_box(sum);
    Ok(())
}

pub fn run(args: Args, as_json: bool) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("cnse-store-bench-{}", std::process::id())));
    let own_dir = args.dir.is_none();
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = measure(&args, &dir, as_json);
    if own_dir {
        let _ = fs::remove_dir_all(&dir);
    } else {
        let _ = fs::remove_dir_all(dir.join("store"));
        let _ = fs::remove_file(dir.join("cp-copy"));
    }
    result
}

fn measure(args: &Args, dir: &Path, as_json: bool) -> Result<()> {
    let file = match &args.file {
        Some(f) => f.clone(),
        None => {
            let f = dir.join("bench-input");
            eprintln!("writing {} MiB of random bytes to {}", args.size_mib, f.display());
            make_file(&f, args.size_mib << 20)?;
            f
        }
    };
    let size = fs::metadata(&file)
        .with_context(|| format!("stat {}", file.display()))?
        .len();
    if size == 0 {
        bail!("{} is empty", file.display());
    }
    warm(&file)?;
    let runs = args.runs;
    // Other work on the machine skews every figure; say how much there was.
    let load_before = load_average();

    // 1. Single-stream hash: ring over a map vs openssl.
    let mut ring_t = Vec::new();
    let mut ossl_t = Vec::new();
    let mut digest = None;
    for _ in 0..runs {
        let (t, d) = time(|| {
            // SAFETY: the input is not truncated during the benchmark.
            let map = unsafe { cnse_store::map_file(&file) }?;
            Ok(cnse_store::sha256_stream(&map, &mut |_| {}))
        })?;
        ring_t.push(t);
        digest = Some(d);
        let (t, out) = time(|| run_cmd(Command::new("openssl").arg("dgst").arg("-sha256").arg("-r").arg(&file)))?;
        ossl_t.push(t);
        let theirs: Digest = out.split_whitespace().next().unwrap_or("").parse()?;
        if Some(theirs) != digest {
            bail!("openssl says {theirs}, the store says {}", digest.expect("set"));
        }
    }
    let (ring_s, ossl_s) = (stats(ring_t), stats(ossl_t));

    // 2. put vs max(openssl, cp + sync), each from a synced, warm start.
    let copy = dir.join("cp-copy");
    let store_dir = dir.join("store");
    let mut cp_t = Vec::new();
    let mut put_t = Vec::new();
    for _ in 0..runs {
        let _ = fs::remove_file(&copy);
        sync_all()?;
        let (t, _) = time(|| {
            run_cmd(Command::new("cp").arg(&file).arg(&copy))?;
            sync_all()
        })?;
        cp_t.push(t);
        let _ = fs::remove_file(&copy);
        let _ = fs::remove_dir_all(&store_dir);
        let store = Store::open(&store_dir)?;
        sync_all()?;
        let (t, o) = time(|| {
            // SAFETY: the benchmark input is not truncated while it runs.
            let src = unsafe { cnse_store::SourceFile::open(&file) }?;
            Ok(store.put(&src, &PutOptions::default(), &|_| {})?)
        })?;
        if Some(o.digest) != digest {
            bail!(
                "put stored {} but the file hashes to {}",
                o.digest,
                digest.expect("set")
            );
        }
        put_t.push(t);
    }
    let (cp_s, put_s) = (stats(cp_t), stats(put_t));
    let put_ref_best = ossl_s.best.max(cp_s.best);
    let put_ref_median = ossl_s.median.max(cp_s.median);

    // 3. Parallel verify of the stored blob, page cache warm.
    let store = Store::open(&store_dir)?;
    let d = digest.expect("set");
    let blob = store.open_blob(&d)?;
    warm(blob.path())?;
    let threads_max = args.threads_max.unwrap_or_else(cnse_store::default_threads).max(1);
    let mut verify = Vec::new();
    for threads in 1..=threads_max {
        let mut ts = Vec::new();
        for _ in 0..runs {
            let (t, bad) = time(|| Ok(blob.bad_chunks(threads, &|_| {})))?;
            if !bad.is_empty() {
                bail!("verify found bad chunks {bad:?} in a fresh blob");
            }
            ts.push(t);
        }
        verify.push((threads, stats(ts)));
    }
    let v1 = gbps(size, verify[0].1.best);

    let cores = cnse_store::default_threads();
    let load_after = load_average();
    if as_json {
        println!(
            "{}",
            json!({
                "file_bytes": size, "runs": runs, "cores": cores, "digest": d.to_string(),
                "load_average_before": load_before, "load_average_after": load_after,
                "hash": {"store_best_s": ring_s.best.as_secs_f64(), "store_median_s": ring_s.median.as_secs_f64(),
                         "openssl_best_s": ossl_s.best.as_secs_f64(), "openssl_median_s": ossl_s.median.as_secs_f64(),
                         "rate_ratio_best": ossl_s.best.as_secs_f64() / ring_s.best.as_secs_f64(),
                         "rate_ratio_median": ossl_s.median.as_secs_f64() / ring_s.median.as_secs_f64()},
                "put": {"put_best_s": put_s.best.as_secs_f64(), "put_median_s": put_s.median.as_secs_f64(),
                        "cp_sync_best_s": cp_s.best.as_secs_f64(), "cp_sync_median_s": cp_s.median.as_secs_f64(),
                        "ratio_best": put_s.best.as_secs_f64() / put_ref_best.as_secs_f64(),
                        "ratio_median": put_s.median.as_secs_f64() / put_ref_median.as_secs_f64()},
                "verify": verify.iter().map(|(t, s)| json!({"threads": t, "best_s": s.best.as_secs_f64(),
                        "median_s": s.median.as_secs_f64(), "gb_per_s": gbps(size, s.best),
                        "efficiency": gbps(size, s.best) / (*t as f64 * v1)})).collect::<Vec<_>>(),
            })
        );
        return Ok(());
    }
    println!(
        "store bench: {} ({size} bytes), {runs} runs each, {cores} cores; load average {load_before} before, \
         {load_after} after; best / median",
        file.display()
    );
    println!(
        "hash   store (ring, mmap)   {:>7.3} s / {:>7.3} s   {:.2} GB/s",
        ring_s.best.as_secs_f64(),
        ring_s.median.as_secs_f64(),
        gbps(size, ring_s.best)
    );
    println!(
        "       openssl dgst -sha256 {:>7.3} s / {:>7.3} s   {:.2} GB/s",
        ossl_s.best.as_secs_f64(),
        ossl_s.median.as_secs_f64(),
        gbps(size, ossl_s.best)
    );
    println!(
        "       rate store/openssl   {:.3} / {:.3}   (target >= 0.95)",
        ossl_s.best.as_secs_f64() / ring_s.best.as_secs_f64(),
        ossl_s.median.as_secs_f64() / ring_s.median.as_secs_f64()
    );
    println!(
        "put    store put            {:>7.3} s / {:>7.3} s",
        put_s.best.as_secs_f64(),
        put_s.median.as_secs_f64()
    );
    println!(
        "       cp + sync            {:>7.3} s / {:>7.3} s",
        cp_s.best.as_secs_f64(),
        cp_s.median.as_secs_f64()
    );
    println!(
        "       put / max(openssl, cp+sync)  {:.3} / {:.3}   (target <= 1.15)",
        put_s.best.as_secs_f64() / put_ref_best.as_secs_f64(),
        put_s.median.as_secs_f64() / put_ref_median.as_secs_f64()
    );
    for (t, s) in &verify {
        let r = gbps(size, s.best);
        println!(
            "verify {t:>2} thread{}          {:>7.3} s / {:>7.3} s   {:.2} GB/s   efficiency {:.2} (target >= 0.85)",
            if *t == 1 { " " } else { "s" },
            s.best.as_secs_f64(),
            s.median.as_secs_f64(),
            r,
            r / (*t as f64 * v1)
        );
    }
    Ok(())
}
