//! The llama backend against a real llama-server with SmolLM2-135M (started
//! by scripts/llama-server.sh unless CNSE_LLAMA_URL names one).

mod common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, FinishReason, Params};
use cnse_llama::direct::Client;
use cnse_llama::testing::{Driver, Recorder};
use common::{backend, busy_slots, config, direct_answer, llama, RealServer};

/// CPU inference on 2 cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const PROMPT: &str = "The three primary colors are";

fn real_config(urls: &[&str]) -> cnse_llama::LlamaConfig {
    let mut cfg = config(urls);
    cfg.first_token_timeout = Duration::from_secs(30);
    cfg.idle_token_timeout = Duration::from_secs(10);
    cfg.health_interval = Duration::from_secs(1);
    cfg.health_timeout = Duration::from_secs(2);
    cfg
}

fn greedy(n: u32) -> Params {
    Params {
        max_tokens: n,
        temperature: 0.0,
        ..Params::default()
    }
}

#[test]
fn greedy_text_equals_llama_servers_own_answer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _server)) = llama() else { return };
    let mut b = backend(real_config(&[&url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for (id, (prompt, n)) in [(PROMPT, 24), ("def fibonacci(n):", 32), ("Olá! Je m'appelle", 16)]
        .into_iter()
        .enumerate()
    {
        let id = id as u64 + 1;
        d.start(&mut b, id, greedy(n), prompt).unwrap();
        assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(60), |s| s.finished(id)));
        let r = sink.get(id);
        assert_eq!(r.error, None);
        let want = direct_answer(&url, prompt, n);
        assert!(!want.is_empty());
        assert_eq!(r.text(), want, "prompt {prompt:?}");
        assert!(r.tokens >= 1 && r.tokens <= u64::from(n));
        if r.tokens == u64::from(n) {
            assert_eq!(r.end, Some(FinishReason::Length));
        }
        // The same answer through the direct client (the benchmark's
        // baseline), which streams with the backend's request body.
        let mut c = Client::new(&url, Duration::from_secs(60), false).unwrap();
        let direct = c.complete(&greedy(n), prompt, |_, _| {}).unwrap();
        assert_eq!(direct.text, want);
        assert_eq!(direct.tokens, r.tokens);
    }
}

#[test]
fn four_concurrent_streams_complete() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _server)) = llama() else { return };
    let mut b = backend(real_config(&[&url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let prompts = ["Once upon a time", "The ocean is", "My favourite food is", "In 1969,"];
    for (k, p) in prompts.iter().enumerate() {
        d.start(&mut b, k as u64 + 1, greedy(32), p).unwrap();
    }
    assert_eq!(b.stats().active, 4);
    assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(120), |s| s.all_finished(1..=4)));
    for (k, p) in prompts.iter().enumerate() {
        let r = sink.get(k as u64 + 1);
        assert_eq!(r.error, None, "{p}");
        assert!(r.end.is_some());
        assert!(r.tokens >= 1 && r.tokens <= 32);
        // Concurrency does not change a greedy answer.
        assert_eq!(r.text(), direct_answer(&url, p, 32), "{p}");
    }
}

#[test]
fn cancel_mid_stream_frees_the_llama_slot() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _server)) = llama() else { return };
    let mut b = backend(real_config(&[&url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    // Long enough that it would run for seconds if not stopped.
    let p = greedy(400);
    d.start(&mut b, 1, p, "Count from one to one hundred:").unwrap();
    assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(60), |s| s.get(1).tokens >= 5));
    assert_eq!(busy_slots(&url), 1, "the stream occupies one llama-server slot");
    d.cancel(&mut b, 1);
    let t0 = Instant::now();
    let mut freed = false;
    while t0.elapsed() < Duration::from_secs(3) {
        d.run_for(&mut b, &mut sink, Duration::from_millis(5));
        if busy_slots(&url) == 0 {
            freed = true;
            break;
        }
    }
    assert!(freed, "llama-server still generating 3 s after the cancel");
    eprintln!("llama-server slot free {:?} after the cancel", t0.elapsed());
    let r = sink.get(1);
    assert!(r.end.is_none() && r.error.is_none());
    assert!(r.tokens < 400);
    assert_eq!(b.inflight(0), 0);
}

#[test]
fn killing_llama_server_mid_stream_is_502_and_the_other_keeps_serving() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Two instances of our own: one gets killed.
    let Some(doomed) = RealServer::start() else { return };
    let Some(other) = RealServer::start() else { return };
    let mut cfg = real_config(&[&doomed.url, &other.url]);
    // Failover would continue the stream on `other` (tests/failover.rs,
    // tests/llama_failover.rs at the top level).
    cfg.failover = false;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let p = Params {
        max_tokens: 400,
        temperature: 0.0,
        ..Params::default()
    };
    // Least-outstanding routing puts one stream on each.
    d.start(&mut b, 1, p, "Count from one to one hundred:").unwrap();
    d.start(&mut b, 2, p, "Count from one to one hundred:").unwrap();
    assert_eq!((b.inflight(0), b.inflight(1)), (1, 1));
    assert!(
        d.run_until(&mut b, &mut sink, Duration::from_secs(60), |s| s.get(1).tokens >= 3
            && s.get(2).tokens >= 3)
    );
    doomed.kill();
    let t0 = Instant::now();
    assert!(
        d.run_until(&mut b, &mut sink, Duration::from_secs(10), |s| s.finished(1)
            || s.finished(2))
    );
    let (dead, alive) = if sink.finished(1) { (1, 2) } else { (2, 1) };
    let (code, msg) = sink.get(dead).error.expect("the killed server's stream fails");
    assert_eq!(code, 502, "{msg}");
    assert!(msg.contains(&doomed.url), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(!b.is_healthy(0));
    // New work goes to the survivor while the other stream goes on.
    d.start(&mut b, 3, greedy(16), PROMPT).unwrap();
    assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(120), |s| s
        .all_finished([alive, 3])));
    for id in [alive, 3] {
        let r = sink.get(id);
        assert_eq!(r.error, None, "stream {id}");
        assert!(r.end.is_some());
    }
    assert_eq!(sink.get(3).text(), direct_answer(&other.url, PROMPT, 16));
}

#[test]
fn issue12_requests_to_llama_server_find_a_connection_opened_ahead() {
    // llama-server closes its connection after every stream: each request
    // after the first takes a spare connected while the previous one ran,
    // and none is sent on a connection llama-server already closed.
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _server)) = llama() else { return };
    let mut cfg = real_config(&[&url]);
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let end = Instant::now() + Duration::from_secs(10);
    while b.llama_stats().spares_opened == 0 {
        assert!(Instant::now() < end, "no spare connected: {:?}", b.llama_stats());
        d.run_for(&mut b, &mut sink, Duration::from_millis(10));
    }
    for id in 1..=4u64 {
        d.start(&mut b, id, greedy(4), PROMPT).unwrap();
        assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(60), |s| s.finished(id)));
        assert_eq!(sink.get(id).error, None, "request {id}");
        let end = Instant::now() + Duration::from_secs(10);
        while b.inflight(0) != 0 {
            assert!(Instant::now() < end, "place not given back: {:?}", b.llama_stats());
            d.run_for(&mut b, &mut sink, Duration::from_millis(10));
        }
    }
    let st = b.llama_stats();
    assert_eq!(st.spares_taken + st.reused, 4, "{st:?}");
    assert_eq!(st.retried, 0, "{st:?}");
}
