//! `cnse-dp demo`, the main job: an in-process server with the synthetic
//! backend on an ephemeral loopback port, driven by the load generator;
//! prints the latency table and the server's own counters.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context};
use cnse_client::load::{self, LoadConfig, Mode};
use cnse_server::{Config, Server};

#[derive(clap::Args)]
pub struct Args {
    /// Measured time.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Time before the measurement (not recorded).
    #[arg(long, default_value_t = 1.0)]
    pub warmup_secs: f64,
    /// Client connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Streams in flight per connection.
    #[arg(long, default_value_t = 4)]
    pub inflight: usize,
    /// Server worker threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// Tokens per request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Credit window per stream in tokens (0 = unlimited).
    #[arg(long, default_value_t = 16)]
    pub credit: u32,
    /// Synthetic model: time to first token (a small model's prefill).
    #[arg(long, default_value_t = 20_000)]
    pub synthetic_ttft_us: u64,
    /// Synthetic model: time per token (5 ms = 200 tokens/s per stream).
    #[arg(long, default_value_t = 5_000)]
    pub synthetic_token_interval_us: u64,
    /// Open loop at this many requests per second instead of a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value = "Write a haiku about the sea.")]
    pub prompt: String,
    /// Also write the results as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !(args.duration_secs.is_finite() && args.duration_secs > 0.0) {
        anyhow::bail!("--duration-secs must be > 0");
    }
    if !(args.warmup_secs.is_finite() && args.warmup_secs >= 0.0) {
        anyhow::bail!("--warmup-secs must be >= 0");
    }
    let config = Config {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        threads: args.threads,
        ..Config::default()
    };
    let factory = crate::serve::synthetic_factory(args.synthetic_ttft_us, args.synthetic_token_interval_us);
    let server = Server::start(config, factory).context("starting the demo server")?;
    let addr = server.local_addr();
    println!(
        "cnse-dp demo: server on {addr} ({} worker thread(s), synthetic model: TTFT {:.1} ms, {:.1} ms/token, {} tokens/request)",
        server.threads(),
        args.synthetic_ttft_us as f64 / 1e3,
        args.synthetic_token_interval_us as f64 / 1e3,
        args.max_tokens,
    );
    let shape = match args.rate {
        Some(r) => format!("open loop at {r:.0} requests/s"),
        None => "closed loop".to_string(),
    };
    println!(
        "load: {} connections x {} streams in flight, {shape}, credit window {}, {:.0} s (+{:.0} s warm-up)",
        args.connections, args.inflight, args.credit, args.duration_secs, args.warmup_secs
    );
    let cfg = LoadConfig {
        connections: args.connections,
        inflight: args.inflight,
        threads: args.client_threads,
        rate_per_s: args.rate,
        duration: Duration::from_secs_f64(args.duration_secs),
        warmup: Duration::from_secs_f64(args.warmup_secs),
        allocation_counter: Some(crate::alloc_count::allocations),
        ..LoadConfig::new(
            addr,
            Mode::Generate {
                max_tokens: args.max_tokens,
                credit: args.credit,
                temperature: 0.0,
                prompt: args.prompt.clone(),
            },
        )
    };
    let result = load::run(&cfg).map_err(|e| anyhow!("running the load: {e}"));
    let stats = server.stats();
    server
        .shutdown()
        .map_err(|e| anyhow!("stopping the demo server: {e}"))?;
    let mut report = result?;
    // Server and load share this process: its CPU time is both together.
    let process_cpu = report.client_cpu.take();
    let process_allocations = report.allocations.take();
    report.client_runq_wait = None;
    println!();
    crate::bench::print_report(&report);
    if let Some(cpu) = process_cpu {
        println!(
            "process cpu    {:.2} s ({:.0}% of one core), server and load together",
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / report.window.as_secs_f64()
        );
    }
    if let Some(n) = process_allocations {
        println!("allocations    {n} in the window, server and load together");
    }
    println!(
        "server: {} connections accepted, {} requests, {} tokens, {} frames in, {} frames out, {} violations, {} rejected",
        stats.conns_accepted,
        stats.requests,
        stats.tokens_sent,
        stats.frames_in,
        stats.frames_out,
        stats.violations,
        stats.rejected
    );
    if let Some(path) = &args.csv {
        let rates: Vec<_> = report.rates().into_iter().chain(report.cpu_use()).collect();
        let rows = cnse_metrics::csv_rows(&report.label(), &report.summaries(), &rates);
        cnse_metrics::write_csv(path, &rows).map_err(|e| anyhow!("{e}"))?;
        eprintln!("wrote {}", path.display());
    }
    crate::bench::check_clean(std::slice::from_ref(&report))
}
