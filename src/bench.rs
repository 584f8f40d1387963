//! `cnse-dp bench`: the load generator against a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use cnse_client::load::{self, LoadConfig, LoadReport, Mode};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// PING echo of `--payload-bytes`.
    Ping,
    /// REQUEST for `--max-tokens` tokens.
    Generate,
    /// Streaming `POST /v1/completions` for `--max-tokens` tokens over
    /// HTTP/1.1 (`--addr` is the HTTP address; `--inflight` requests are
    /// pipelined per connection).
    Http,
    /// PING in RESP to a redis-compatible server at `--addr` (redis-server):
    /// the same load `--mode ping --payload-bytes 0` puts on cnse-dp, so the
    /// two are compared on one engine (`--inflight` PINGs pipelined per
    /// connection, like redis-benchmark's `-P`).
    Resp,
}

/// The load shape, shared with `cnse-dp demo`.
#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 256)]
    pub connections: usize,
    /// Streams in flight per connection.
    #[arg(long, default_value_t = 1)]
    pub inflight: usize,
    /// Client threads (one io_uring each).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, value_enum, default_value_t = ModeArg::Ping)]
    pub mode: ModeArg,
    /// PING payload size.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Tokens per request (generate).
    #[arg(long, default_value_t = 16)]
    pub max_tokens: u32,
    /// HTTP mode: ask for the usage chunk (`stream_options.include_usage`),
    /// so tokens packed into one event are counted (one more event per
    /// request for the server to write).
    #[arg(long)]
    pub http_include_usage: bool,
    /// Credit window per stream in tokens (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    pub credit: u32,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value = "Write a haiku about the sea.")]
    pub prompt: String,
    /// Open loop at this many requests per second (all threads together);
    /// without it the run is a closed loop.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: shortest sleep between sends in µs; requests due within
    /// it leave together (latency still counts from each intended time).
    #[arg(long, default_value_t = load::OPEN_LOOP_TICK_US_DEFAULT)]
    pub tick_us: u64,
    /// Client threads poll instead of sleeping: requests leave at their
    /// intended times and replies are read as they land (a core per
    /// thread; the server never wakes a sleeping client).
    #[arg(long)]
    pub busy_poll: bool,
    /// Find the peak with a closed loop first, then run an open loop at this
    /// fraction of it (e.g. 0.7) and report both.
    #[arg(long, conflicts_with = "rate")]
    pub peak_fraction: Option<f64>,
    /// Open loop at each of these rates in turn (requests/s, comma
    /// separated), then one summary line per rate: where latency bends.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rate", "peak_fraction"])]
    pub sweep_rates: Vec<f64>,
    /// Measured time.
    #[arg(long, default_value_t = 10.0)]
    pub duration_secs: f64,
    /// Time before the measurement (not recorded).
    #[arg(long, default_value_t = 2.0)]
    pub warmup_secs: f64,
    /// Stop after this many measured requests (after the warm-up); the
    /// window ends with the last of them, `--duration-secs` caps it.
    #[arg(long)]
    pub requests: Option<u64>,
    /// Time streams still in flight at the end may take to finish.
    #[arg(long, default_value_t = 5_000)]
    pub drain_timeout_ms: u64,
    /// CPUs to pin client threads to, comma separated (e.g. `1`).
    #[arg(long, value_delimiter = ',')]
    pub client_cpus: Vec<usize>,
    /// PID of a local server: its CPU time over the window is reported, with
    /// requests and tokens per server CPU-second.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Also write the results as CSV (one row per metric; see docs/BENCHMARKS.md).
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// File holding the auth key (its content without a trailing newline).
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// What to load: a cnse-dp server at `--addr`; llama-server itself over
    /// HTTP streaming at `--llama-url` (the gateway's baseline); or all
    /// side by side (llama-compare: the same load straight to llama-server
    /// and through an in-process cnse-dp with the llama backend, over its
    /// binary protocol and over its HTTP front, rotated each round).
    #[arg(long, value_enum, default_value = "cnse")]
    pub target: crate::bench_llama::Target,
    /// llama-server base URL for `--target llama-http|llama-compare`.
    #[arg(long)]
    pub llama_url: Option<String>,
    /// Instead of `--llama-url`, serve a stand-in of llama-server in this
    /// process (its wire format, a fixed pace): isolates what the gateway
    /// adds from CPU inference noise.
    #[arg(long)]
    pub llama_standin: bool,
    /// Stand-in: time to first token.
    #[arg(long, default_value_t = 20_000)]
    pub standin_ttft_us: u64,
    /// Stand-in: time between tokens.
    #[arg(long, default_value_t = 5_000)]
    pub standin_token_interval_us: u64,
    /// Stand-in: close the connection after each streamed answer, as
    /// llama-server does.
    #[arg(long)]
    pub standin_close_after_stream: bool,
    /// llama-compare: idle connections to llama-server the in-process
    /// gateway keeps connected ahead of requests (`serve
    /// --llama-spare-conns`; default: one per connection, as `serve`
    /// defaults to --llama-inflight).
    #[arg(long)]
    pub llama_spare_conns: Option<usize>,
    /// llama-compare: spares over all workers (`serve --llama-spares-max`).
    #[arg(long, default_value_t = cnse_llama::SPARES_MAX_DEFAULT)]
    pub llama_spares_max: usize,
    /// llama-compare: the in-process gateway's worker polls its ring for
    /// N µs after a turn with work before it sleeps (`serve
    /// --busy-poll-us`; a diagnostic of wake-up latency: above the
    /// backend's pace it spins through the waits).
    #[arg(long, default_value_t = 0)]
    pub gateway_busy_poll_us: u64,
    /// llama-compare: the in-process gateway's worker batches its waits
    /// into windows of N µs (`serve --batch-wait-us`).
    #[arg(long, default_value_t = 0)]
    pub gateway_batch_wait_us: u64,
    /// llama-compare: hold /dev/cpu_dma_latency at N µs during the run
    /// (`serve --cpu-dma-latency-us`; the whole machine, so both sides).
    #[arg(long)]
    pub cpu_dma_latency_us: Option<u32>,
    /// llama-compare: rounds of (direct, through cnse-dp's binary
    /// protocol, direct over HTTP, through its HTTP front), rotated so that
    /// drift hits every side alike.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    /// `chat`: multi-turn conversations through in-process cnse-dps in
    /// front of the `--llama-url` servers (comma separated), one per
    /// routing policy of `--policies`, side by side; `uniform`: unrelated
    /// prompts, closed loop, the same way (docs/LLAMA.md "Cache-aware
    /// routing").
    #[arg(long, value_enum, default_value = "load")]
    pub workload: crate::bench_chat::Workload,
    /// chat: conversations (uniform: closed-loop clients).
    #[arg(long, default_value_t = 6)]
    pub sessions: usize,
    /// chat: turns per conversation.
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// chat: pause between a turn's answer and the next question.
    #[arg(long, default_value_t = 500)]
    pub think_ms: u64,
    /// chat: length of the shared system prompt, in tokens (about).
    #[arg(long, default_value_t = 1000)]
    pub system_tokens: usize,
    /// chat/uniform: the routing policies compared.
    #[arg(long, value_delimiter = ',', default_value = "least-outstanding,prefix")]
    pub policies: Vec<cnse_llama::Route>,
    /// chat/uniform: requests in flight per llama-server (its slots).
    #[arg(long, default_value_t = 4)]
    pub llama_inflight: usize,
    #[command(flatten)]
    pub load: LoadArgs,
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("--{what} must be a non-negative number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl LoadArgs {
    pub fn config(&self, addr: SocketAddr, auth_token: Vec<u8>) -> anyhow::Result<LoadConfig> {
        let mode = match self.mode {
            ModeArg::Ping => Mode::Ping {
                payload_bytes: self.payload_bytes,
            },
            ModeArg::Generate => Mode::Generate {
                max_tokens: self.max_tokens,
                credit: self.credit,
                temperature: self.temperature,
                prompt: self.prompt.clone(),
            },
            ModeArg::Http => Mode::Http {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                prompt: self.prompt.clone(),
                include_usage: self.http_include_usage,
            },
            ModeArg::Resp => Mode::Resp,
        };
        if let Some(f) = self.peak_fraction {
            if !(f > 0.0 && f <= 10.0) {
                bail!("--peak-fraction must be in (0, 10], got {f}");
            }
        }
        let duration = secs(self.duration_secs, "duration-secs")?;
        if duration.is_zero() {
            bail!("--duration-secs must be > 0");
        }
        Ok(LoadConfig {
            addr,
            connections: self.connections,
            inflight: self.inflight,
            threads: self.threads,
            mode,
            rate_per_s: self.rate,
            duration,
            warmup: secs(self.warmup_secs, "warmup-secs")?,
            auth_token,
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
            connect_timeout: Duration::from_secs(5),
            cpus: self.client_cpus.clone(),
            open_loop_tick: Duration::from_micros(self.tick_us),
            busy_poll: self.busy_poll,
            server_pid: self.server_pid,
            allocation_counter: Some(crate::alloc_count::allocations),
            requests: self.requests,
        })
    }
}

/// Runs the load (and the open-loop follow-up of `--peak-fraction`),
/// printing each table; writes the CSV when asked.
pub fn drive(args: &LoadArgs, cfg: LoadConfig) -> anyhow::Result<Vec<LoadReport>> {
    let mut reports = Vec::new();
    if !args.sweep_rates.is_empty() {
        for &rate in &args.sweep_rates {
            if !(rate.is_finite() && rate > 0.0) {
                bail!("--sweep-rates: {rate} is not a positive rate");
            }
        }
        for &rate in &args.sweep_rates {
            let open = LoadConfig {
                rate_per_s: Some(rate),
                ..cfg.clone()
            };
            let r = load::run(&open).map_err(|e| anyhow!("running the open loop at {rate}/s: {e}"))?;
            print_report(&r);
            println!();
            reports.push(r);
        }
        print_sweep(&reports);
    } else {
        let first = load::run(&cfg).map_err(|e| anyhow!("running the load: {e}"))?;
        print_report(&first);
        let peak = first.requests_per_s();
        reports.push(first);
        if let Some(f) = args.peak_fraction {
            if peak <= 0.0 {
                bail!("the closed loop completed no request; no peak to take a fraction of");
            }
            let rate = peak * f;
            println!();
            println!(
                "open loop at {:.0}% of the closed-loop peak ({peak:.0}/s): {rate:.0}/s",
                f * 100.0
            );
            let open = LoadConfig {
                rate_per_s: Some(rate),
                ..cfg
            };
            let second = load::run(&open).map_err(|e| anyhow!("running the open loop: {e}"))?;
            print_report(&second);
            reports.push(second);
        }
    }
    if let Some(path) = &args.csv {
        let mut rows = String::new();
        for r in &reports {
            let rates: Vec<_> = r.rates().into_iter().chain(r.cpu_rates()).chain(r.cpu_use()).collect();
            rows.push_str(&cnse_metrics::csv_rows(&r.label(), &r.summaries(), &rates));
        }
        // Errors carry their cause in the message: flatten to one line.
        cnse_metrics::write_csv(path, &rows).map_err(|e| anyhow!("{e}"))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(reports)
}

/// One line per open-loop rate: offered, achieved, the percentiles of
/// every request intended in the window (`e2e_all`: errors, unanswered and
/// unsent included), requests never sent, and the CPU the load generator
/// and the server used.
fn print_sweep(reports: &[LoadReport]) {
    use cnse_metrics::{fmt_rate, fmt_us};
    println!("open loop, latency of every request from its intended send (e2e_all):");
    println!(
        "{:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>11}",
        "offered", "achieved", "p50", "p90", "p95", "p99", "p99.9", "max", "unsent", "errors", "load cpu", "server cpu"
    );
    let pct = |c: Duration, r: &LoadReport| format!("{:.0}%", 100.0 * c.as_secs_f64() / r.window.as_secs_f64());
    for r in reports {
        let e = r.e2e_all().unwrap_or_else(|_| r.e2e.clone());
        println!(
            "{:>12} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>11}",
            fmt_rate(r.rate_per_s.unwrap_or(0.0)),
            fmt_rate(r.requests_per_s()),
            fmt_us(e.quantile_us(0.5) as f64),
            fmt_us(e.quantile_us(0.9) as f64),
            fmt_us(e.quantile_us(0.95) as f64),
            fmt_us(e.quantile_us(0.99) as f64),
            fmt_us(e.quantile_us(0.999) as f64),
            fmt_us(e.max_us() as f64),
            r.unsent,
            r.error_count(),
            pct(r.load_cpu, r),
            r.server_cpu.map_or("-".to_string(), |c| pct(c, r))
        );
    }
}

/// What the latency rows of a run mean, one line above its table.
fn loop_note(r: &LoadReport) -> String {
    match r.rate_per_s {
        None => "closed loop: latency from each request's send; every slot re-issues as its request \
                 ends, so this is a saturated server's latency (in flight / throughput), not one at a chosen rate"
            .to_string(),
        Some(rate) => format!(
            "open loop at {}: latency from each request's intended send; e2e_all counts every request \
             intended in the window (errors, and those unanswered or unsent when the run gave up, at that time)",
            cnse_metrics::fmt_rate(rate)
        ),
    }
}

pub fn print_report(r: &LoadReport) {
    println!("{}: {:.1} s measured", r.label(), r.window.as_secs_f64());
    println!("{}", loop_note(r));
    print!("{}", cnse_metrics::render_table(&r.summaries(), &r.rates()));
    let w = r.window.as_secs_f64();
    if r.mode == "generate" && r.tokens > 0 {
        println!(
            "coalesced      {} of {} tokens arrived in one frame with an earlier token of their stream \
             (no gap of their own: not in inter_token)",
            r.tokens_coalesced, r.tokens
        );
    }
    println!(
        "load cpu       {:.2} s ({:.0}% of one core, {} load thread(s))",
        r.load_cpu.as_secs_f64(),
        100.0 * r.load_cpu.as_secs_f64() / w,
        r.threads
    );
    let waited = |d: Option<Duration>| {
        d.map_or(String::new(), |d| {
            format!(", waited {:.2} s for a CPU", d.as_secs_f64())
        })
    };
    let kernel =
        |share: Option<f64>| share.map_or(String::new(), |k| format!(", {:.0}% of it in the kernel", 100.0 * k));
    if let Some(cpu) = r.server_cpu {
        let per: Vec<String> = r
            .cpu_rates()
            .iter()
            .map(|x| {
                let what = x.metric.split("_per_").next().unwrap_or("");
                format!("{} {what}", cnse_metrics::fmt_rate(x.per_s()).trim_end_matches("/s"))
            })
            .collect();
        println!(
            "server cpu     {:.2} s ({:.0}% of one core{}{}): {} per server CPU-second",
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / w,
            kernel(r.server_kernel_share),
            waited(r.server_runq_wait),
            per.join(", ")
        );
    }
    if let Some(cpu) = r.client_cpu {
        println!(
            "client cpu     {:.2} s ({:.0}% of one core{}{})",
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / w,
            kernel(r.client_kernel_share),
            waited(r.client_runq_wait)
        );
    }
    if let Some(n) = r.allocations {
        println!(
            "allocations    {n} in the window ({} frames in and out)",
            r.frames_in + r.frames_out
        );
    }
    if r.reconnects > 0 {
        println!(
            "reconnects     {} (keep-alive connections the server ended between responses), {} requests sent again",
            r.reconnects, r.resent
        );
    }
    if let Some(p) = r.problems() {
        println!("problems: {p}");
    }
}

/// A run whose frames broke the protocol or whose connections died is not
/// a measurement: fail after printing it.
pub fn check_clean(reports: &[LoadReport]) -> anyhow::Result<()> {
    for r in reports {
        if r.bad_frames > 0 || r.connections_lost > 0 {
            bail!(
                "{}: {} bad frames, {} connections lost",
                r.label(),
                r.bad_frames,
                r.connections_lost
            );
        }
        if r.requests == 0 {
            bail!("{}: no request completed in the measured window", r.label());
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.workload != crate::bench_chat::Workload::Load {
        return crate::bench_chat::run(&args);
    }
    if args.target != crate::bench_llama::Target::Cnse {
        return crate::bench_llama::run(&args);
    }
    let token = match &args.auth_key_file {
        Some(p) => crate::client::read_auth_key(p)?,
        None => Vec::new(),
    };
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&args.addr)
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.addr))?;
    let cfg = args.load.config(addr, token)?;
    let reports = drive(&args.load, cfg)?;
    check_clean(&reports)
}
