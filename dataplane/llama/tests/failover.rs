//! Issue 14, failover: a stream whose llama-server fails after tokens were
//! delivered continues on another server from its text so far. The fakes
//! make the seam visible: the first server sends `t0 t1 t2 ` and drops the
//! connection; `Behaviour::Continue` answers with the tokens that follow
//! the `tK` words of its prompt, so a duplicated or lost token shows in
//! the text.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cnse_backend::{FinishReason, Params};
use cnse_llama::testing::{Driver, Recorder};
use cnse_llama::{LlamaConfig, Route};
use common::{backend, config, Behaviour, Fake};

const BOUND: Duration = Duration::from_secs(5);
/// The prompt ends with a space, so that `tK` words after it count.
const PROMPT: &str = "hello ";

fn params(n: u32) -> Params {
    Params {
        max_tokens: n,
        temperature: 0.7,
        top_p: 0.9,
        top_k: 40,
        seed: 1234,
        ..Params::default()
    }
}

fn words(n: usize) -> String {
    (0..n).map(|k| format!("t{k} ")).collect()
}

/// Least-outstanding routing over `urls` in order (the first takes the
/// stream first).
fn cfg(urls: &[&str]) -> LlamaConfig {
    let mut c = config(urls);
    c.route = Route::LeastOutstanding;
    c
}

fn run(c: LlamaConfig, n: u32) -> (cnse_llama::LlamaBackend, cnse_llama::testing::Record) {
    let mut b = backend(c);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(n), PROMPT).unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    d.run_for(&mut b, &mut sink, Duration::from_millis(50));
    (b, sink.get(1))
}

#[test]
fn issue14_failover_continues_the_stream_with_no_token_lost_or_repeated() {
    let mid = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
    let next = Fake::start(Behaviour::Continue);
    let (b, r) = run(cfg(&[&mid.url, &next.url]), 8);
    assert_eq!(r.error, None);
    assert_eq!((r.text(), r.tokens, r.end), (words(8), 8, Some(FinishReason::Length)));
    assert_eq!((r.failed_over, r.tokens_at_failover, r.after_end), (1, Some(3), 0));
    assert_eq!(b.llama_stats().failed_over, 1);
    assert_eq!(b.llama_stats().retried_elsewhere, 0);
    assert!(!b.is_healthy(0), "the server that died is evicted");
    assert_eq!((b.inflight(0), b.inflight(1)), (0, 0));
    // The continuation: prompt + text so far, the tokens left, the same
    // sampling, no slot of the dead server.
    let bodies = next.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 1);
    let first: serde_json::Value = serde_json::from_str(&mid.bodies.lock().unwrap()[0]).unwrap();
    let cont: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
    assert_eq!(cont["prompt"], format!("{PROMPT}{}", words(3)));
    assert_eq!(cont["n_predict"], 5);
    for k in [
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "min_p",
        "stream",
        "cache_prompt",
    ] {
        assert_eq!(cont[k], first[k], "{k}");
    }
    assert!(cont.get("id_slot").is_none());
}

#[test]
fn issue14_failover_twice_folds_all_text_and_tries_each_server_once() {
    let a = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
    // Continues from t3 but dies after 3 more.
    let b2 = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
    let c = Fake::start(Behaviour::Continue);
    let (b, r) = run(cfg(&[&a.url, &b2.url, &c.url]), 10);
    assert_eq!(r.error, None);
    // The second server's fake text restarts at t0: what the client got
    // is exactly what each server sent, in order, and nothing twice.
    let want = format!("{}{}t6 t7 t8 t9 ", words(3), words(3));
    assert_eq!((r.text(), r.tokens, r.end), (want, 10, Some(FinishReason::Length)));
    assert_eq!(r.failed_over, 2);
    let requests = |f: &Fake| f.requests.load(Ordering::SeqCst);
    assert_eq!((requests(&a), requests(&b2), requests(&c)), (1, 1, 1));
    let last: serde_json::Value = serde_json::from_str(&c.bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(last["prompt"], format!("{PROMPT}{}{}", words(3), words(3)));
    assert_eq!(last["n_predict"], 4);
    assert_eq!(b.llama_stats().failed_over, 2);
}

#[test]
fn issue14_failover_budget_exhausted_is_502() {
    // Three servers that all die after 2 tokens, two moves allowed: each
    // is tried once, then the stream fails.
    let f: Vec<Fake> = (0..3)
        .map(|_| Fake::start(Behaviour::CloseMidStream { tokens: 2 }))
        .collect();
    let (b, r) = run(cfg(&[&f[0].url, &f[1].url, &f[2].url]), 20);
    assert_eq!(r.error.as_ref().map(|e| e.0), Some(502), "{r:?}");
    assert_eq!((r.tokens, r.failed_over, r.end), (6, 2, None));
    for s in &f {
        assert_eq!(s.requests.load(Ordering::SeqCst), 1);
    }
    assert_eq!(b.llama_stats().failed_over, 2);
    // One move allowed: the third server is never asked.
    let f: Vec<Fake> = (0..3)
        .map(|_| Fake::start(Behaviour::CloseMidStream { tokens: 2 }))
        .collect();
    let mut c = cfg(&[&f[0].url, &f[1].url, &f[2].url]);
    c.retries_max = 1;
    let (_, r) = run(c, 20);
    assert_eq!(r.error.as_ref().map(|e| e.0), Some(502));
    assert_eq!((r.tokens, r.failed_over), (4, 1));
    assert_eq!(f[2].requests.load(Ordering::SeqCst), 0);
}

#[test]
fn issue14_failover_off_or_text_past_its_bound_is_502() {
    for (failover, bound) in [(false, cnse_llama::FAILOVER_TEXT_BYTES_DEFAULT), (true, 8)] {
        let mid = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
        let next = Fake::start(Behaviour::Continue);
        let mut c = cfg(&[&mid.url, &next.url]);
        c.failover = failover;
        // "t0 t1 t2 " is 9 bytes: one more than the bound.
        c.failover_text_bytes_max = bound;
        let (b, r) = run(c, 8);
        assert_eq!(r.error.as_ref().map(|e| e.0), Some(502), "failover {failover}");
        assert_eq!((r.tokens, r.failed_over), (3, 0));
        assert_eq!(next.requests.load(Ordering::SeqCst), 0);
        assert_eq!(b.llama_stats().failed_over, 0);
    }
}

#[test]
fn issue14_server_lost_after_the_last_token_ends_the_stream_without_failover() {
    // All of max_tokens arrived; only the final event was lost.
    let mid = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
    let next = Fake::start(Behaviour::Continue);
    let (b, r) = run(cfg(&[&mid.url, &next.url]), 3);
    assert_eq!((r.text(), r.end, r.error), (words(3), Some(FinishReason::Length), None));
    assert_eq!(r.failed_over, 0);
    assert_eq!(next.requests.load(Ordering::SeqCst), 0);
    assert_eq!(b.llama_stats().failed_over, 0);
}
