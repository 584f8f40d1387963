//! `cnse-dp llama-standin`: the llama-server stand-in of the benchmarks
//! (`cnse_llama::standin`) as a process of its own, so that other programs
//! (the Python SDK's benchmark, the official `openai` package) can use it:
//! llama-server's `/completion`, `/v1/completions` and `/health` at a fixed
//! pace. Prints `listening on http://ADDR`, then serves until killed.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use cnse_llama::standin::{Standin, StandinConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Time to first token.
    #[arg(long, default_value_t = 20_000)]
    pub ttft_us: u64,
    /// Time between tokens (0 with --ttft-us 0: as fast as it can write).
    #[arg(long, default_value_t = 5_000)]
    pub token_interval_us: u64,
    /// Close the connection after each streamed answer, as llama-server
    /// does (default: keep it for the next request).
    #[arg(long)]
    pub close_after_stream: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let s = Standin::start(StandinConfig {
        ttft: Duration::from_micros(args.ttft_us),
        token_interval: Duration::from_micros(args.token_interval_us),
        close_after_stream: args.close_after_stream,
    })
    .context("starting the llama-server stand-in")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on {}", s.url()).context("writing to stdout")?;
    out.flush().context("writing to stdout")?;
    drop(out);
    // Serves on its own threads until SIGINT/SIGTERM ends the process.
    loop {
        std::thread::park();
    }
}
