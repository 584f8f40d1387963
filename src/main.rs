//! `cnse-dp`: the command-line front of the data plane. Each subcommand lives
//! in its own module; this file only parses and dispatches, and turns every
//! error into one line and a non-zero exit.

use clap::{Parser, Subcommand};

mod alloc_count;
mod bench;
mod bench_chat;
mod bench_idle;
mod bench_llama;
mod bench_scaling;
mod bench_wake;
mod client;
mod cpu_latency;
mod demo;
mod gpu;
mod gpu_bench_configs;
mod gpu_bench_load;
mod gpu_bench_resident;
mod gpu_bench_sampling;
mod gpu_load;
mod gpu_picker;
mod gpu_verify_bench;
mod key_file;
mod serve;
mod serve_llama;
mod serve_ranks;
mod serve_synthetic;
mod signals;
mod sim;
mod soak;
mod standin;
mod store;
mod thread_cpu;

#[derive(Parser)]
#[command(name = "cnse-dp", version, about = "Zero-copy io_uring data plane for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format on stderr: `text` or `json` (one object per line).
    /// Filters come from RUST_LOG (default `info`), e.g.
    /// `RUST_LOG=cnse_server=debug,cnse_llama=warn`.
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the CNSE v1 protocol until SIGINT/SIGTERM.
    Serve(serve::Args),
    /// Send one prompt, print tokens as they arrive, then TTFT and total time.
    Client(client::Args),
    /// Load generator: latency percentiles, throughput, CSV.
    Bench(bench::Args),
    /// Idle connections held open: what each costs the server (RSS, descriptors).
    BenchIdle(bench_idle::Args),
    /// Wake latency between two cores' rings: IORING_OP_MSG_RING against an eventfd.
    BenchWake(bench_wake::Args),
    /// Work-stealing scheduler scaling: synthetic tasks alone or across MPI ranks.
    BenchScaling(bench_scaling::Args),
    /// The main job: a server with the synthetic backend plus a load, printing the latency table.
    Demo(demo::Args),
    /// Content-addressed model store.
    Store(store::Args),
    /// GPU path: device info, verified model loads.
    Gpu(gpu::Args),
    /// Soak: a mixed population against one server for a long time; samples
    /// RSS, descriptors, connections and counters every second; fails on a
    /// lost or wrong stream or on growth without bound.
    Soak(soak::Args),
    /// Deterministic simulation of the session layer (replay a seed, or run many).
    Sim(sim::Args),
    /// A llama-server stand-in at a fixed pace (`/completion`, `/v1/completions`), for benchmarks.
    LlamaStandin(standin::Args),
}

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line, as for every other error: clap's first line names
            // the bad argument and the accepted values.
            let text = e.to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("bad arguments");
            let hint = text.lines().find(|l| l.contains("possible values")).map(str::trim);
            match hint {
                Some(h) => eprintln!("cnse-dp: {first} {h}"),
                None => eprintln!("cnse-dp: {first}"),
            }
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        logs.json().init();
    } else {
        logs.init();
    }
    let result = match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Client(a) => client::run(a),
        Command::Bench(a) => bench::run(a),
        Command::BenchScaling(a) => bench_scaling::run(a),
        Command::BenchWake(a) => bench_wake::run(a),
        Command::BenchIdle(a) => bench_idle::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Store(a) => store::run(a),
        Command::Gpu(a) => gpu::run(a),
        Command::Sim(a) => sim::run(a),
        Command::Soak(a) => soak::run(a),
        Command::LlamaStandin(a) => standin::run(a),
    };
    if let Err(e) = result {
        eprintln!("cnse-dp: error: {e:#}");
        std::process::exit(1);
    }
}
