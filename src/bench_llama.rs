//! `cnse-dp bench --target llama-http|llama-compare`: the gateway-overhead
//! benchmark. The same closed-loop load (`--connections` × `--inflight`
//! streams, `--max-tokens`, `--prompt`) goes four ways, side by side in
//! each round: straight to llama-server's `/completion` (cnse_llama::direct,
//! which decodes exactly as the backend does) and through cnse-dp's binary
//! protocol (the CNSE load generator); straight to llama-server's
//! `/v1/completions` and through cnse-dp's OpenAI HTTP front, both driven
//! by the same HTTP load generator (`bench --mode http`, one stream per
//! connection). Every side is measured by its client, from sending the
//! request to the first token and to the end.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cnse_client::load::{self, LoadReport, Mode};
use cnse_llama::direct;
use cnse_metrics::{fmt_us, LatencyHistogram, Rate};
use cnse_proto::Params;

use crate::bench::Args;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// A cnse-dp server at --addr.
    Cnse,
    /// llama-server directly over HTTP streaming at --llama-url.
    LlamaHttp,
    /// llama-server directly and through an in-process cnse-dp, side by side.
    LlamaCompare,
}

/// One side's measurements, merged over rounds.
struct Side {
    ttft: LatencyHistogram,
    /// Recorded by the io_uring load generators (not by the direct client).
    inter_token: Option<LatencyHistogram>,
    e2e: LatencyHistogram,
    tokens: u64,
    requests: u64,
    window: Duration,
    errors: u64,
    first_error: Option<String>,
}

impl Side {
    fn new() -> Self {
        Self {
            ttft: LatencyHistogram::new(),
            inter_token: None,
            e2e: LatencyHistogram::new(),
            tokens: 0,
            requests: 0,
            window: Duration::ZERO,
            errors: 0,
            first_error: None,
        }
    }

    fn add_direct(&mut self, r: &direct::LoadReport) {
        for s in &r.samples {
            if let Some(t) = s.ttft {
                self.ttft.record(t);
            }
            self.e2e.record(s.total);
        }
        self.tokens += r.window_tokens;
        self.requests += r.window_requests;
        self.window += r.window;
        self.errors += r.errors.len() as u64;
        if self.first_error.is_none() {
            self.first_error = r.errors.first().cloned();
        }
    }

    fn add_cnse(&mut self, r: &LoadReport) -> anyhow::Result<()> {
        self.ttft.merge(&r.ttft).context("merging histograms")?;
        self.inter_token
            .get_or_insert_with(LatencyHistogram::new)
            .merge(&r.inter_token)
            .context("merging histograms")?;
        self.e2e.merge(&r.e2e).context("merging histograms")?;
        self.tokens += r.tokens;
        self.requests += r.requests;
        self.window += r.window;
        self.errors += r.error_count() + r.connections_lost + r.bad_frames + r.unfinished;
        if self.first_error.is_none() {
            self.first_error = r.problems();
        }
        Ok(())
    }

    fn tokens_per_s(&self) -> f64 {
        Rate::new("tokens", self.tokens, self.window).per_s()
    }

    fn requests_per_s(&self) -> f64 {
        Rate::new("requests", self.requests, self.window).per_s()
    }
}

fn direct_load(args: &Args) -> anyhow::Result<direct::Load> {
    let l = &args.load;
    if l.mode != crate::bench::ModeArg::Generate {
        bail!("--target llama-http/llama-compare measures generation: use --mode generate");
    }
    if l.credit != 0 {
        bail!("--credit is not supported with --target llama-*: llama-server's HTTP API has no credit");
    }
    if l.rate.is_some() || l.peak_fraction.is_some() {
        bail!("--target llama-* runs a closed loop: --rate/--peak-fraction are not supported");
    }
    if !(l.duration_secs.is_finite() && l.duration_secs > 0.0) {
        bail!("--duration-secs must be > 0");
    }
    if !(l.warmup_secs.is_finite() && l.warmup_secs >= 0.0) {
        bail!("--warmup-secs must be >= 0");
    }
    Ok(direct::Load {
        params: Params {
            max_tokens: l.max_tokens,
            temperature: l.temperature,
            ..Params::default()
        },
        prompt: l.prompt.clone(),
        cache_prompt: false,
        timeout: Duration::from_secs(60),
        warmup: Duration::from_secs_f64(l.warmup_secs),
        duration: Duration::from_secs_f64(l.duration_secs),
    })
}

fn run_direct(url: &str, concurrency: usize, load: &direct::Load, side: &mut Side) -> anyhow::Result<()> {
    let r = direct::run_load(url, concurrency, load).with_context(|| format!("direct load against {url}"))?;
    side.add_direct(&r);
    Ok(())
}

fn print_side(name: &str, s: &Side) {
    println!(
        "{name}: {} requests, {} tokens in {:.1} s; {}",
        s.requests,
        s.tokens,
        s.window.as_secs_f64(),
        if s.errors == 0 {
            "no errors".to_string()
        } else {
            format!(
                "{} errors (first: {})",
                s.errors,
                s.first_error.as_deref().unwrap_or("?")
            )
        }
    );
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let _latency = crate::cpu_latency::hold(args.cpu_dma_latency_us)?;
    let standin = if args.llama_standin {
        if args.llama_url.is_some() {
            bail!("--llama-standin and --llama-url exclude each other");
        }
        let s = cnse_llama::standin::Standin::start(cnse_llama::standin::StandinConfig {
            ttft: Duration::from_micros(args.standin_ttft_us),
            token_interval: Duration::from_micros(args.standin_token_interval_us),
            close_after_stream: args.standin_close_after_stream,
        })
        .context("starting the llama-server stand-in")?;
        println!(
            "llama-server stand-in at {} (ttft {} µs, token interval {} µs)",
            s.url(),
            args.standin_ttft_us,
            args.standin_token_interval_us
        );
        Some(s)
    } else {
        None
    };
    let standin_url = standin.as_ref().map(|s| s.url());
    let url = match (&standin_url, &args.llama_url) {
        (Some(u), _) => u.as_str(),
        (None, Some(u)) => u.as_str(),
        (None, None) => {
            bail!("--target llama-http/llama-compare needs --llama-url http://host:port or --llama-standin")
        }
    };
    cnse_llama::parse_url(url).context("--llama-url")?;
    let load = direct_load(args)?;
    let concurrency = args.load.connections * args.load.inflight;
    if concurrency == 0 || concurrency > direct::CONCURRENCY_MAX {
        bail!("--connections × --inflight must be 1..={}", direct::CONCURRENCY_MAX);
    }
    if args.target == Target::LlamaHttp {
        let mut side = Side::new();
        run_direct(url, concurrency, &load, &mut side)?;
        print_side("llama-server direct", &side);
        print_table(&[("direct", &side)]);
        if side.errors > 0 {
            bail!("{} requests failed", side.errors);
        }
        return Ok(());
    }
    if args.rounds == 0 {
        bail!("--rounds must be >= 1");
    }
    // The gateway in this process: one worker thread (the cores are shared
    // with llama-server and the clients), the llama backend in front of
    // the same llama-server.
    let factory = cnse_llama::LlamaFactory::new(cnse_llama::LlamaConfig {
        urls: vec![url.to_string()],
        inflight_per_backend: concurrency,
        spare_conns: args.llama_spare_conns.unwrap_or(concurrency),
        spares_max: args.llama_spares_max,
        ..Default::default()
    })
    .context("--llama-url")?;
    let server = cnse_server::Server::start(
        cnse_server::Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            http_listen: Some("127.0.0.1:0".parse().expect("literal address")),
            threads: 1,
            pin_threads: false,
            join_listen: false,
            busy_poll: Duration::from_micros(args.gateway_busy_poll_us),
            batch_wait: Duration::from_micros(args.gateway_batch_wait_us),
            ..Default::default()
        },
        Arc::new(factory),
    )
    .context("starting the in-process cnse-dp")?;
    let mut cfg = args.load.config(server.local_addr(), Vec::new())?;
    cfg.mode = Mode::Generate {
        max_tokens: args.load.max_tokens,
        credit: 0,
        temperature: args.load.temperature,
        prompt: args.load.prompt.clone(),
    };
    // The HTTP sides: one stream per keep-alive connection (llama-server
    // closes after every streamed answer, so pipelining buys nothing).
    let http_cfg = |addr| load::LoadConfig {
        addr,
        connections: concurrency,
        inflight: 1,
        mode: Mode::Http {
            max_tokens: args.load.max_tokens,
            temperature: args.load.temperature,
            prompt: args.load.prompt.clone(),
            // cnse-dp's front packs the tokens of one loop turn into one
            // event (a late turn carries several); usage counts them.
            // llama-server reports usage on every stream anyway.
            include_usage: true,
        },
        ..cfg.clone()
    };
    let llama_addr = cnse_llama::parse_url(url).context("--llama-url")?.addr;
    let front_addr = server.http_addr().context("the in-process HTTP front has no address")?;
    let (direct_http_cfg, front_cfg) = (http_cfg(llama_addr), http_cfg(front_addr));
    let mut sides: [Side; 4] = std::array::from_fn(|_| Side::new());
    for round in 0..args.rounds {
        // Rotate which side goes first so drift favours none.
        for k in 0..sides.len() {
            let which = (round + k) % sides.len();
            let side = &mut sides[which];
            match which {
                0 => run_direct(url, concurrency, &load, side)?,
                1 => side.add_cnse(&load::run(&cfg).context("load through cnse-dp")?)?,
                2 => side.add_cnse(&load::run(&direct_http_cfg).context("HTTP load straight to llama-server")?)?,
                _ => side.add_cnse(&load::run(&front_cfg).context("HTTP load through cnse-dp's front")?)?,
            }
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }
    server.shutdown().context("stopping the in-process cnse-dp")?;
    println!(
        "llama-server gateway overhead (closed loop): {concurrency} streams, max_tokens {}, {} round(s) of {:.1} s per side",
        args.load.max_tokens, args.rounds, args.load.duration_secs
    );
    let [direct_side, gateway_side, direct_http, front] = &sides;
    print_side("direct /completion", direct_side);
    print_side("via cnse-dp binary", gateway_side);
    print_side("direct /v1/completions", direct_http);
    print_side("via cnse-dp HTTP front", front);
    println!("-- binary protocol (CNSE client) against llama-server's /completion (its blocking client)");
    print_table(&[("direct", direct_side), ("via cnse-dp", gateway_side)]);
    println!("-- HTTP: the same HTTP load generator, straight to llama-server and through cnse-dp's front");
    print_table(&[("direct", direct_http), ("via front", front)]);
    if sides.iter().map(|s| s.errors).sum::<u64>() > 0 {
        bail!("some requests failed: not a clean measurement");
    }
    Ok(())
}

fn print_table(sides: &[(&str, &Side)]) {
    let mut header = format!("{:<16}", "metric");
    for (name, _) in sides {
        header.push_str(&format!("{name:>14}"));
    }
    if sides.len() == 2 {
        header.push_str(&format!("{:>14}", "added"));
    }
    println!("{header}");
    // NaN where a side's client does not record gaps.
    fn gap(s: &Side, q: f64) -> f64 {
        s.inter_token.as_ref().map_or(f64::NAN, |h| h.quantile_us(q) as f64)
    }
    let us = |v: f64| if v.is_nan() { "-".to_string() } else { fmt_us(v) };
    // Every percentile of cnse_metrics::PERCENTILES, the max and the mean,
    // for TTFT and e2e (closed loop: from each request's send), and the
    // inter-token gap where recorded.
    type Pick = fn(&Side) -> &cnse_metrics::LatencyHistogram;
    type Metric = Box<dyn Fn(&Side) -> f64>;
    let hists: [(&str, Pick); 2] = [("ttft", |s| &s.ttft), ("e2e", |s| &s.e2e)];
    let mut rows: Vec<(String, Metric)> = Vec::new();
    for (h, pick) in hists {
        for (p, q) in cnse_metrics::PERCENTILES {
            rows.push((
                format!("{h} {p}"),
                Box::new(move |s: &Side| pick(s).quantile_us(q) as f64),
            ));
        }
        rows.push((
            format!("{h} max"),
            Box::new(move |s: &Side| pick(s).quantile_us(1.0) as f64),
        ));
        rows.push((format!("{h} mean"), Box::new(move |s: &Side| pick(s).mean_us())));
        if h == "ttft" {
            rows.push(("gap p50".to_string(), Box::new(|s: &Side| gap(s, 0.50))));
            rows.push(("gap p99".to_string(), Box::new(|s: &Side| gap(s, 0.99))));
        }
    }
    for (name, f) in rows {
        let mut line = format!("{name:<16}");
        for (_, s) in sides {
            line.push_str(&format!("{:>14}", us(f(s))));
        }
        if let [(_, a), (_, b)] = sides {
            let d = f(b) - f(a);
            let added = match d {
                d if d.is_nan() => "-".to_string(),
                d if d < 0.0 => format!("-{}", us(-d)),
                d => format!("+{}", us(d)),
            };
            line.push_str(&format!("{added:>14}"));
        }
        println!("{line}");
    }
    for (name, f) in [
        ("tokens/s", Side::tokens_per_s as fn(&Side) -> f64),
        ("requests/s", Side::requests_per_s),
    ] {
        let mut line = format!("{name:<16}");
        for (_, s) in sides {
            line.push_str(&format!("{:>14}", format!("{:.1}/s", f(s))));
        }
        if let [(_, a), (_, b)] = sides {
            let ratio = if f(a) > 0.0 { (f(b) / f(a) - 1.0) * 100.0 } else { 0.0 };
            line.push_str(&format!("{:>13.2}%", ratio));
        }
        println!("{line}");
    }
}
