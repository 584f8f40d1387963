//! `cnse-dp client`: one prompt, tokens printed as they arrive.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cnse_client::{Client, ClientError};
use cnse_proto::Params;

#[derive(clap::Args)]
pub struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// File holding the auth key (its content without a trailing newline).
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold in (0, 1]; 1 disables.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Top-k sampling; 0 disables.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Credit window in tokens (0 = unlimited); more is granted as tokens arrive.
    #[arg(long, default_value_t = 0)]
    pub credit: u32,
    /// Give up when the server sends nothing for this long.
    #[arg(long, default_value_t = 30_000)]
    pub timeout_ms: u64,
    /// Session key the REQUEST carries (1-256 visible ASCII characters;
    /// docs/PROTOCOL.md "Session keys"): `serve --llama-route session`
    /// keeps the requests of one key on one llama-server.
    #[arg(long)]
    pub session: Option<String>,
}

/// Reads an auth key file: its content without one trailing newline;
/// refused when group or others can read or write it.
pub fn read_auth_key(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    crate::key_file::read_key_file(path)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let token = match &args.auth_key_file {
        Some(p) => read_auth_key(p)?,
        None => Vec::new(),
    };
    let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&args.addr)
        .with_context(|| format!("resolving {}", args.addr))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.addr))?;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    if args
        .session
        .as_deref()
        .is_some_and(|k| !cnse_proto::session_key_valid(k.as_bytes()))
    {
        anyhow::bail!("--session: 1-256 visible ASCII characters (0x21-0x7e) expected");
    }
    let (mut client, _ack) = Client::connect_hello(addr, &token, timeout).map_err(one_line)?;
    client.set_session(args.session.as_deref()).map_err(one_line)?;
    let params = Params {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        priority: 0,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let stream_id = 1;
    let result = client.generate(stream_id, args.credit, &params, &args.prompt, |text, _| {
        let _ = out.write_all(text);
        let _ = out.flush();
    });
    let g = result.map_err(one_line)?;
    let _ = writeln!(out);
    drop(out);
    let ttft = g
        .client_ttft
        .map_or("-".to_string(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3));
    eprintln!(
        "{} tokens, finish {:?}; TTFT {ttft} (server {:.2} ms), total {:.2} ms (server {:.2} ms)",
        g.tokens,
        g.reason,
        g.server_ttft_us as f64 / 1e3,
        g.client_total.as_secs_f64() * 1e3,
        g.server_total_us as f64 / 1e3,
    );
    Ok(())
}

fn one_line(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}
