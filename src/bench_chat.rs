//! `cnse-dp bench --workload chat|uniform --llama-url A,B,C`: cache-aware
//! routing (issue 14) measured against least-outstanding, side by side.
//!
//! For each routing policy an in-process cnse-dp (the llama backend in
//! front of the same llama-servers) serves the same load:
//! - `chat`: `--sessions` conversations of `--turns` turns; every prompt is
//!   a shared system prompt of about `--system-tokens` tokens, the
//!   conversation so far and a new question; turn by turn (all sessions
//!   send turn t, then think for `--think-ms`, then turn t+1). Reports TTFT
//!   per policy (all turns, first turn, later turns) and the prompt tokens
//!   llama-server took from its KV cache (`timings.cache_n`) against those
//!   it evaluated (`prompt_n`), from the second turn on.
//! - `uniform`: `--sessions` closed-loop clients sending unrelated prompts
//!   for `--duration-secs`; requests/s per policy.
//!
//! Every policy run starts its prompts with its own run tag, so no policy
//! finds what an earlier one left in llama-server's caches. The tags have
//! one shape (`run NONCE-ROUND-POLICY`, only digits differ): with greedy
//! decoding a prompt's words decide how many tokens the model writes, and
//! a tag naming the policy once made one policy's prompts end after 1
//! token and the other's after up to 11, which no routing explains.

use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use cnse_client::Client;
use cnse_llama::{CacheCounters, LlamaFactory, Route};
use cnse_metrics::{fmt_us, LatencyHistogram};
use cnse_proto::Params;

use crate::bench::Args;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// The load of `--mode` (`bench`'s usual closed or open loop).
    Load,
    /// Multi-turn conversations with a shared system prompt.
    Chat,
    /// Unrelated prompts, closed loop (requests/s).
    Uniform,
}

/// One policy's measurements.
struct Run {
    policy: Route,
    ttft: LatencyHistogram,
    ttft_first: LatencyHistogram,
    ttft_later: LatencyHistogram,
    e2e: LatencyHistogram,
    /// Cache counters summed over servers: first turn, later turns.
    first: CacheCounters,
    later: CacheCounters,
    requests: u64,
    /// Tokens generated in the window's requests (the work done: two
    /// policies compare only when it is the same per request).
    tokens: u64,
    window: Duration,
    errors: u64,
    first_error: Option<String>,
}

impl Run {
    fn new(policy: Route) -> Self {
        Self {
            policy,
            ttft: LatencyHistogram::new(),
            ttft_first: LatencyHistogram::new(),
            ttft_later: LatencyHistogram::new(),
            e2e: LatencyHistogram::new(),
            first: CacheCounters::default(),
            later: CacheCounters::default(),
            requests: 0,
            tokens: 0,
            window: Duration::ZERO,
            errors: 0,
            first_error: None,
        }
    }
}

fn policy_name(p: Route) -> &'static str {
    match p {
        Route::LeastOutstanding => "least-outstanding",
        Route::Prefix => "prefix",
        Route::Session => "session",
    }
}

fn sum(c: &[CacheCounters]) -> CacheCounters {
    c.iter().fold(CacheCounters::default(), |a, b| CacheCounters {
        cached_tokens: a.cached_tokens + b.cached_tokens,
        evaluated_tokens: a.evaluated_tokens + b.evaluated_tokens,
    })
}

fn minus(a: CacheCounters, b: CacheCounters) -> CacheCounters {
    CacheCounters {
        cached_tokens: a.cached_tokens - b.cached_tokens,
        evaluated_tokens: a.evaluated_tokens - b.evaluated_tokens,
    }
}

/// About `tokens` tokens of varied English (5.5 characters a token for
/// SmolLM2's tokenizer on this text: 4,512 characters were 811 tokens by
/// llama-server's `/tokenize`), starting with the run tag.
fn system_prompt(tag: &str, tokens: usize) -> String {
    const WORDS: [&str; 16] = [
        "assistant",
        "answers",
        "briefly",
        "clearly",
        "questions",
        "about",
        "science",
        "history",
        "cooking",
        "travel",
        "and",
        "always",
        "stays",
        "polite",
        "helpful",
        "honest",
    ];
    // The tag comes first: runs of different policies share no prefix.
    let mut s = format!("[{tag}] <|im_start|>system\nYou are a careful assistant. Rules:");
    let mut k = 0usize;
    while s.len() < tokens * 11 / 2 {
        s.push(' ');
        s.push_str(WORDS[(k * 7 + k / 16) % WORDS.len()]);
        k += 1;
        if k.is_multiple_of(12) {
            s.push_str(&format!(". Rule {}:", k / 12));
        }
    }
    s.push_str(".<|im_end|>\n");
    s
}

const QUESTIONS: [&str; 8] = [
    "Name a fruit that is red.",
    "Why is the sky blue?",
    "Give me one word that rhymes with cat.",
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "Suggest a name for a dog.",
    "What do bees make?",
    "Which planet is the largest?",
];

fn chat_prompt(system: &str, history: &str, session: usize, turn: usize) -> String {
    let q = QUESTIONS[(session + turn * 3) % QUESTIONS.len()];
    format!("{system}{history}<|im_start|>user\n(conversation {session}) {q}<|im_end|>\n<|im_start|>assistant\n")
}

fn params(args: &Args) -> Params {
    Params {
        max_tokens: args.load.max_tokens,
        temperature: 0.0,
        ..Params::default()
    }
}

/// Starts an in-process cnse-dp with the llama backend under `policy`.
fn gateway(
    urls: &[String],
    policy: Route,
    inflight: usize,
) -> anyhow::Result<(cnse_server::Server, Arc<LlamaFactory>)> {
    let factory = Arc::new(
        LlamaFactory::new(cnse_llama::LlamaConfig {
            urls: urls.to_vec(),
            inflight_per_backend: inflight,
            route: policy,
            // Both policies use llama-server's cache; only routing differs.
            cache_prompt: true,
            // CPU prefill of a long prompt on a shared machine can take
            // more than the default minute.
            first_token_timeout: Duration::from_secs(300),
            // Nor evict a server whose health answer is slow for the same
            // reason.
            health_timeout: Duration::from_secs(10),
            ..Default::default()
        })
        .context("--llama-url")?,
    );
    if policy.uses_cache() && factory.learn_slots().contains(&0) {
        bail!("a llama-server did not answer GET /slots (start it with --slots)");
    }
    let server = cnse_server::Server::start(
        cnse_server::Config {
            listen: "127.0.0.1:0".parse().expect("literal address"),
            threads: 2,
            pin_threads: false,
            ..Default::default()
        },
        factory.clone(),
    )
    .context("starting the in-process cnse-dp")?;
    Ok((server, factory))
}

fn chat_run(args: &Args, urls: &[String], policy: Route, tag: &str) -> anyhow::Result<Run> {
    let (sessions, turns) = (args.sessions, args.turns);
    let (server, factory) = gateway(urls, policy, args.llama_inflight)?;
    let addr = server.local_addr();
    let system = system_prompt(tag, args.system_tokens);
    let barrier = Arc::new(Barrier::new(sessions + 1));
    let results = Arc::new(Mutex::new(Vec::new()));
    let p = params(args);
    let think = Duration::from_millis(args.think_ms);
    let mut threads = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let (barrier, results, system) = (barrier.clone(), results.clone(), system.clone());
        threads.push(std::thread::spawn(move || {
            let mut client = Client::connect(addr, Duration::from_secs(120)).ok();
            if let Some(c) = client.as_mut() {
                let _ = c.hello(b"");
            }
            let mut history = String::new();
            for t in 0..turns {
                barrier.wait();
                let prompt = chat_prompt(&system, &history, s, t);
                let r = match client.as_mut() {
                    Some(c) => c
                        .generate(t as u64 + 1, 0, &p, &prompt, |_, _| {})
                        .map_err(|e| e.to_string()),
                    None => Err("cannot connect".to_string()),
                };
                if let Ok(g) = &r {
                    let answer = String::from_utf8_lossy(&g.text);
                    let q = &prompt[system.len() + history.len()..];
                    history.push_str(q);
                    history.push_str(&answer);
                    history.push_str("<|im_end|>\n");
                }
                results
                    .lock()
                    .expect("no panics under the lock")
                    .push((t, r.map(|g| (g.client_ttft, g.client_total, g.tokens))));
                barrier.wait();
                std::thread::sleep(think);
            }
        }));
    }
    let mut run = Run::new(policy);
    let started = Instant::now();
    let mut before = sum(&factory.cache_counters());
    for t in 0..turns {
        barrier.wait();
        barrier.wait();
        let now = sum(&factory.cache_counters());
        let d = minus(now, before);
        before = now;
        let into = if t == 0 { &mut run.first } else { &mut run.later };
        into.cached_tokens += d.cached_tokens;
        into.evaluated_tokens += d.evaluated_tokens;
    }
    for th in threads {
        th.join().map_err(|_| anyhow::anyhow!("a session thread panicked"))?;
    }
    run.window = started.elapsed();
    server.shutdown().context("stopping the in-process cnse-dp")?;
    for (t, r) in results.lock().expect("no panics under the lock").drain(..) {
        match r {
            Ok((ttft, total, tokens)) => {
                run.requests += 1;
                run.tokens += tokens;
                let ttft = ttft.unwrap_or(total);
                run.ttft.record(ttft);
                if t == 0 {
                    &mut run.ttft_first
                } else {
                    &mut run.ttft_later
                }
                .record(ttft);
                run.e2e.record(total);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    Ok(run)
}

fn uniform_run(args: &Args, urls: &[String], policy: Route, tag: &str) -> anyhow::Result<Run> {
    let (server, factory) = gateway(urls, policy, args.llama_inflight)?;
    let addr = server.local_addr();
    let p = params(args);
    let warmup = Duration::from_secs_f64(args.load.warmup_secs);
    let duration = Duration::from_secs_f64(args.load.duration_secs);
    let results = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for s in 0..args.sessions {
        let (results, tag) = (results.clone(), tag.to_string());
        threads.push(std::thread::spawn(move || {
            let Ok(mut c) = Client::connect(addr, Duration::from_secs(120)) else {
                results
                    .lock()
                    .expect("no panics under the lock")
                    .push((Instant::now(), Err("cannot connect".to_string())));
                return;
            };
            let _ = c.hello(b"");
            let mut k = 0u64;
            while t0.elapsed() < warmup + duration {
                k += 1;
                // Unrelated prompts: the first bytes differ. A story's
                // opening: the model writes all `max_tokens` (it ends a
                // one-sentence answer after 1 token), so every request
                // does the same work under every policy.
                let prompt = format!(
                    "{k}-{s} [{tag}] Here is a long story about the number {}. Once upon a time,",
                    k * 31 + s as u64
                );
                let r = c
                    .generate(k, 0, &p, &prompt, |_, _| {})
                    .map(|g| (g.client_ttft, g.client_total, g.tokens))
                    .map_err(|e| e.to_string());
                results
                    .lock()
                    .expect("no panics under the lock")
                    .push((Instant::now(), r));
            }
        }));
    }
    for th in threads {
        th.join().map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
    }
    let _ = factory;
    server.shutdown().context("stopping the in-process cnse-dp")?;
    let mut run = Run::new(policy);
    let (from, to) = (t0 + warmup, t0 + warmup + duration);
    let mut last = from;
    for (at, r) in results.lock().expect("no panics under the lock").drain(..) {
        if at < from || at > to {
            continue;
        }
        last = last.max(at);
        match r {
            Ok((ttft, total, tokens)) => {
                run.requests += 1;
                run.tokens += tokens;
                run.ttft.record(ttft.unwrap_or(total));
                run.e2e.record(total);
            }
            Err(e) => {
                run.errors += 1;
                run.first_error.get_or_insert(e);
            }
        }
    }
    run.window = duration;
    Ok(run)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let Some(urls) = &args.llama_url else {
        bail!("--workload chat|uniform needs --llama-url URL[,URL...]");
    };
    let urls: Vec<String> = urls.split(',').map(str::to_string).collect();
    for u in &urls {
        cnse_llama::parse_url(u).context("--llama-url")?;
    }
    if args.sessions == 0 || args.sessions > 256 || args.turns == 0 || args.turns > 64 {
        bail!("--sessions must be 1..=256 and --turns 1..=64");
    }
    if args.rounds == 0 {
        bail!("--rounds must be >= 1");
    }
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut runs: Vec<Run> = Vec::new();
    for round in 0..args.rounds {
        for (k, &policy) in args.policies.iter().enumerate() {
            // Alternate which policy goes first.
            let policy = if round % 2 == 1 {
                args.policies[args.policies.len() - 1 - k]
            } else {
                policy
            };
            // One shape for every policy's tag (see the module's docs).
            let id = args.policies.iter().position(|&p| p == policy).unwrap_or(0);
            let tag = format!("run {nonce}-{round}-{id}");
            let r = match args.workload {
                Workload::Chat => chat_run(args, &urls, policy, &tag)?,
                _ => uniform_run(args, &urls, policy, &tag)?,
            };
            eprintln!(
                "round {}/{}: {} done ({} requests, {} errors)",
                round + 1,
                args.rounds,
                policy_name(policy),
                r.requests,
                r.errors
            );
            match runs.iter_mut().find(|x| x.policy == policy) {
                Some(acc) => merge(acc, r)?,
                None => runs.push(r),
            }
        }
    }
    print_runs(args, &urls, &runs);
    let errors: u64 = runs.iter().map(|r| r.errors).sum();
    if errors > 0 {
        let first = runs.iter().find_map(|r| r.first_error.clone()).unwrap_or_default();
        bail!("{errors} requests failed (first: {first}): not a clean measurement");
    }
    Ok(())
}

fn merge(acc: &mut Run, r: Run) -> anyhow::Result<()> {
    for (a, b) in [
        (&mut acc.ttft, &r.ttft),
        (&mut acc.ttft_first, &r.ttft_first),
        (&mut acc.ttft_later, &r.ttft_later),
        (&mut acc.e2e, &r.e2e),
    ] {
        a.merge(b).context("merging histograms")?;
    }
    for (a, b) in [(&mut acc.first, r.first), (&mut acc.later, r.later)] {
        a.cached_tokens += b.cached_tokens;
        a.evaluated_tokens += b.evaluated_tokens;
    }
    acc.requests += r.requests;
    acc.tokens += r.tokens;
    acc.window += r.window;
    acc.errors += r.errors;
    if acc.first_error.is_none() {
        acc.first_error = r.first_error;
    }
    Ok(())
}

fn print_runs(args: &Args, urls: &[String], runs: &[Run]) {
    match args.workload {
        Workload::Chat => println!(
            "chat workload: {} llama-servers, {} sessions x {} turns, system prompt ~{} tokens, max_tokens {}, think {} ms, {} round(s)",
            urls.len(),
            args.sessions,
            args.turns,
            args.system_tokens,
            args.load.max_tokens,
            args.think_ms,
            args.rounds
        ),
        _ => println!(
            "uniform workload: {} llama-servers, {} closed-loop clients, unrelated prompts, max_tokens {}, {:.0} s per policy, {} round(s)",
            urls.len(),
            args.sessions,
            args.load.max_tokens,
            args.load.duration_secs,
            args.rounds
        ),
    }
    let mut header = format!("{:<26}", "metric");
    for r in runs {
        header.push_str(&format!("{:>20}", policy_name(r.policy)));
    }
    println!("{header}");
    let pct = |c: CacheCounters| {
        let all = c.cached_tokens + c.evaluated_tokens;
        if all == 0 {
            "-".to_string()
        } else {
            format!("{:.1} %", 100.0 * c.cached_tokens as f64 / all as f64)
        }
    };
    type Row = (&'static str, Box<dyn Fn(&Run) -> String>);
    let us = |h: fn(&Run) -> &LatencyHistogram, q: f64| -> Box<dyn Fn(&Run) -> String> {
        Box::new(move |r: &Run| {
            if h(r).count() == 0 {
                "-".to_string()
            } else {
                fmt_us(h(r).quantile_us(q) as f64)
            }
        })
    };
    let mut rows: Vec<Row> = vec![
        ("requests", Box::new(|r: &Run| r.requests.to_string())),
        ("errors", Box::new(|r: &Run| r.errors.to_string())),
        ("ttft p50", us(|r| &r.ttft, 0.5)),
        ("ttft p90", us(|r| &r.ttft, 0.9)),
        ("ttft p99", us(|r| &r.ttft, 0.99)),
        ("e2e p50", us(|r| &r.e2e, 0.5)),
    ];
    if args.workload == Workload::Chat {
        rows.extend::<[Row; 8]>([
            (
                "prompt tokens, turn 1",
                Box::new(move |r: &Run| {
                    let n = r.ttft_first.count().max(1);
                    ((r.first.cached_tokens + r.first.evaluated_tokens) / n).to_string()
                }),
            ),
            ("ttft p50, turn 1", us(|r| &r.ttft_first, 0.5)),
            ("ttft p50, turns 2+", us(|r| &r.ttft_later, 0.5)),
            ("ttft p90, turns 2+", us(|r| &r.ttft_later, 0.9)),
            ("cached, turn 1", Box::new(move |r: &Run| pct(r.first))),
            ("cached, turns 2+", Box::new(move |r: &Run| pct(r.later))),
            (
                "prefill saved (tokens)",
                Box::new(|r: &Run| (r.first.cached_tokens + r.later.cached_tokens).to_string()),
            ),
            (
                "prefilled (tokens)",
                Box::new(|r: &Run| (r.first.evaluated_tokens + r.later.evaluated_tokens).to_string()),
            ),
        ]);
    } else {
        rows.extend::<[Row; 3]>([
            (
                "requests/s",
                Box::new(|r: &Run| format!("{:.2}", r.requests as f64 / r.window.as_secs_f64().max(1e-9))),
            ),
            ("tokens generated", Box::new(|r: &Run| r.tokens.to_string())),
            (
                "tokens per request",
                Box::new(|r: &Run| format!("{:.2}", r.tokens as f64 / r.requests.max(1) as f64)),
            ),
        ]);
    }
    for (name, f) in rows {
        let mut line = format!("{name:<26}");
        for r in runs {
            line.push_str(&format!("{:>20}", f(r)));
        }
        println!("{line}");
    }
}
