//! `cnse-dp soak`: one server, a mixed population against it for a long
//! time, a sample of the server every second, and a verdict: every good
//! stream whole and exactly once, nothing growing without bound, and
//! everything back once the population stops (docs/RELIABILITY.md, "Soak").

mod hostile;
mod plot;
mod population;
mod report;
mod rng;
mod sample;
mod server;
mod verdict;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;

use population::{Ctx, Role, Tally, ROLES};
use sample::{Counts, Phase, Sample};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How long the population runs, seconds.
    #[arg(long, default_value_t = 120)]
    pub duration_secs: u64,
    /// Where the CSV, the plot, the summary and the server's log go.
    #[arg(long, default_value = "soak-results")]
    pub out: PathBuf,
    /// Seed of the population (default: from the clock; printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Good streamers (4 streams at once each, checked whole).
    #[arg(long, default_value_t = 4)]
    pub good: usize,
    /// Cancellers (CANCEL at a random point, or a close).
    #[arg(long, default_value_t = 2)]
    pub cancellers: usize,
    /// Slow readers (credit of 1-4 tokens, 2-20 ms between reads).
    #[arg(long, default_value_t = 2)]
    pub slow: usize,
    /// Garbage senders (random bytes and hostile frames).
    #[arg(long, default_value_t = 1)]
    pub garbage: usize,
    /// Connection churn (connect, HELLO, leave).
    #[arg(long, default_value_t = 1)]
    pub churn: usize,
    /// Largest max_tokens of a good or slow stream.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Worker threads of the server the soak starts.
    #[arg(long, default_value_t = 2)]
    pub server_threads: usize,
    /// Synthetic model's pace: time to first token, µs.
    #[arg(long, default_value_t = 20_000)]
    pub synthetic_ttft_us: u64,
    /// Synthetic model's pace: time between tokens, µs.
    #[arg(long, default_value_t = 2_000)]
    pub synthetic_token_interval_us: u64,
    /// Soak a running server at this address instead of starting one
    /// (with --pid and --metrics).
    #[arg(long, requires_all = ["pid", "metrics"])]
    pub addr: Option<SocketAddr>,
    /// The running server's process id (for RSS and descriptors).
    #[arg(long)]
    pub pid: Option<u32>,
    /// The running server's `--metrics-listen` address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Only draw the plot and print the summary of an earlier run's CSV.
    #[arg(long, value_name = "CSV")]
    pub plot_only: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if let Some(csv) = &a.plot_only {
        return replot(&a, csv);
    }
    if a.duration_secs == 0 {
        anyhow::bail!("--duration-secs must be at least 1");
    }
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let mut srv = match (a.addr, a.pid, a.metrics) {
        (Some(addr), Some(pid), Some(metrics)) => server::Target::given(addr, pid, metrics),
        _ => server::Target::start(&a)?,
    };
    println!(
        "soak: seed {seed}, {} s, server pid {} at {} (metrics {}), population good={} cancel={} slow={} garbage={} churn={}",
        a.duration_secs,
        srv.pid,
        srv.addr,
        srv.metrics,
        a.good,
        a.cancellers,
        a.slow,
        a.garbage,
        a.churn
    );
    std::io::stdout().flush().ok();
    let outcome = soak(&a, &mut srv, seed);
    let alive = srv.alive();
    srv.stop();
    let (samples, counts, notes) = outcome?;
    let why = verdict::verdict(&samples, counts, bounds(&a), alive);
    finish(&a, seed, (&samples, counts), &why, &notes)
}

/// The most the population holds at once: one connection per actor, the
/// scrape's, and a few the server has not yet seen close; four streams per
/// good streamer, one per other actor, and a few ending.
fn bounds(a: &Args) -> verdict::Bounds {
    let actors = (a.good + a.cancellers + a.slow + a.garbage + a.churn) as u64;
    verdict::Bounds {
        conns_max: actors + 4,
        streams_max: actors + 3 * a.good as u64 + 4,
    }
}

/// Runs the population against `srv`, sampling every second; returns the
/// samples (also written to soak.csv as they come) and lines for the
/// summary: what was checked, and the population's failure reasons.
fn soak(a: &Args, srv: &mut server::Target, seed: u64) -> anyhow::Result<(Vec<Sample>, Counts, Vec<String>)> {
    let csv_path = a.out.join("soak.csv");
    let mut csv = std::fs::File::create(&csv_path).with_context(|| format!("creating {}", csv_path.display()))?;
    writeln!(csv, "{}", sample::CSV_HEADER)?;
    let ctx = Arc::new(Ctx {
        addr: srv.addr,
        stop: Default::default(),
        tally: Tally::default(),
        max_tokens: a.max_tokens,
    });
    let t0 = Instant::now();
    let mut samples = Vec::new();
    let mut take = |phase: Phase, srv: &mut server::Target, samples: &mut Vec<Sample>| -> anyhow::Result<bool> {
        let Some(s) = srv.sample() else {
            return Ok(false);
        };
        let s = Sample::new(t0.elapsed().as_secs_f64(), phase, s, &ctx.tally);
        writeln!(csv, "{}", sample::csv_row(&s))?;
        csv.flush()?;
        samples.push(s);
        Ok(true)
    };
    // Baseline: the server before any client, three samples a second apart.
    for _ in 0..3 {
        take(Phase::Baseline, srv, &mut samples)?;
        std::thread::sleep(Duration::from_secs(1));
    }
    let counts = [a.good, a.cancellers, a.slow, a.garbage, a.churn];
    let mut actors = Vec::new();
    for (role, n) in ROLES.iter().zip(counts) {
        for i in 0..n {
            let (ctx, role) = (ctx.clone(), *role);
            let s = seed ^ ((role as u64) << 32 | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            actors.push(
                std::thread::Builder::new()
                    .name(format!("soak-{}-{i}", role.name()))
                    .spawn(move || population::run(role, ctx, s))
                    .context("spawning a soak actor")?,
            );
        }
    }
    let start = Instant::now();
    let run_for = Duration::from_secs(a.duration_secs);
    let mut next = start + Duration::from_secs(1);
    let mut alive = true;
    while start.elapsed() < run_for && alive {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += Duration::from_secs(1);
        alive = take(Phase::Run, srv, &mut samples)? && srv.alive();
        progress(a, start, samples.last(), &ctx.tally);
    }
    ctx.stop.store(true, Relaxed);
    // The actors finish what they hold (a stream goes silent for at most
    // READ_TIMEOUT); samples go on meanwhile.
    let baseline = samples.iter().rfind(|s| s.phase == Phase::Baseline).cloned();
    let mut settled_since: Option<Instant> = None;
    let mut after = 0;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if !take(Phase::After, srv, &mut samples)? {
            break;
        }
        after += 1;
        if !actors.iter().all(|h| h.is_finished()) {
            continue;
        }
        let since = *settled_since.get_or_insert_with(Instant::now);
        let back = match (&baseline, samples.last()) {
            (Some(b), Some(s)) => {
                s.server.conns <= b.server.conns
                    && s.server.streams == 0
                    && s.server.fds <= b.server.fds + verdict::FDS_BACK_TOLERANCE
            }
            _ => false,
        };
        if (back && after >= 2) || since.elapsed() >= Duration::from_secs(verdict::SETTLE_S) {
            break;
        }
    }
    for h in actors {
        let _ = h.join();
    }
    let t = &ctx.tally;
    let mut notes = vec![format!(
        "tokens checked against the model's text: {}; cancelled streams that finished before their CANCEL: {}",
        t.tokens_checked.load(Relaxed),
        t.finished_before_cancel.load(Relaxed)
    )];
    notes.extend(t.reasons().into_iter().map(|r| format!("failure: {r}")));
    Ok((samples, Counts::of(t), notes))
}

/// A line a minute (every 10 s in runs under 5 minutes) on stderr.
// `is_multiple_of` is newer than the workspace MSRV (1.80).
#[allow(clippy::manual_is_multiple_of)]
fn progress(a: &Args, start: Instant, s: Option<&Sample>, tally: &Tally) {
    let every = if a.duration_secs < 300 { 10 } else { 60 };
    let t = start.elapsed().as_secs();
    let Some(s) = s else {
        return;
    };
    if t == 0 || t % every != 0 {
        return;
    }
    let failed: u64 = ROLES.iter().map(|r| tally.failed(*r)).sum();
    eprintln!(
        "soak: {t}/{} s rss={} MiB fds={} conns={} streams={} good={} cancel={} slow={} garbage={} churn={} failed={failed}",
        a.duration_secs,
        s.server.rss_kib / 1024,
        s.server.fds,
        s.server.conns,
        s.server.streams,
        tally.ok(Role::Good),
        tally.ok(Role::Canceller),
        tally.ok(Role::Slow),
        tally.ok(Role::Garbage),
        tally.ok(Role::Churn)
    );
}

/// Writes the plot and the summary, prints the verdict; exits 1 on failure.
fn finish(
    a: &Args,
    seed: u64,
    (samples, counts): (&[Sample], Counts),
    why: &[String],
    notes: &[String],
) -> anyhow::Result<()> {
    let svg = a.out.join("soak.svg");
    let secs = samples.iter().filter(|s| s.phase == Phase::Run).count();
    plot::plot(
        &svg,
        samples,
        &format!("cnse-dp soak: {secs} s of population, seed {seed}"),
    )
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("plotting {}", svg.display()))?;
    let text = report::summary(seed, samples, counts, bounds(a), why, notes);
    print!("{text}");
    let path = a.out.join("summary.txt");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    let csv = match &a.plot_only {
        Some(c) => c.clone(),
        None => a.out.join("soak.csv"),
    };
    println!(
        "soak: CSV {}, plot {}, summary {}",
        csv.display(),
        svg.display(),
        path.display()
    );
    if !why.is_empty() {
        for w in why {
            eprintln!("soak: FAIL: {w}");
        }
        std::process::exit(1);
    }
    Ok(())
}

/// `--plot-only CSV`: the plot and the table of an earlier run.
fn replot(a: &Args, csv: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("reading {}", csv.display()))?;
    let samples = sample::parse_csv(&text)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("{}", csv.display()))?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let counts = samples.last().map(Sample::counts).unwrap_or_default();
    let why = verdict::verdict(&samples, counts, bounds(a), true);
    finish(a, a.seed.unwrap_or(0), (&samples, counts), &why, &[])
}
