//! Issue 14: a stream that fails before its first token is sent to another
//! llama-server, and the client sees one ordinary stream; after the first
//! token, or with retries off, it fails as before.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cnse_backend::{FinishReason, Params};
use cnse_llama::testing::{Driver, Recorder};
use cnse_llama::Route;
use common::{backend, config, dead_url, Behaviour, Fake};

fn params(n: u32) -> Params {
    Params {
        max_tokens: n,
        ..Params::default()
    }
}

const BOUND: Duration = Duration::from_secs(5);

fn good() -> Fake {
    Fake::start(Behaviour::Tokens {
        tokens: 5,
        delay: Duration::ZERO,
    })
}

#[test]
fn issue14_refused_connections_are_retried_on_another_server() {
    let ok = good();
    // The dead server first: least-outstanding picks it first.
    let dead = dead_url();
    let mut cfg = config(&[&dead, &ok.url]);
    cfg.route = Route::LeastOutstanding;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(5), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let r = sink.get(1);
    assert_eq!(r.error, None);
    assert_eq!(
        (r.text().as_str(), r.end),
        ("t0 t1 t2 t3 t4 ", Some(FinishReason::Length))
    );
    assert_eq!(b.llama_stats().retried_elsewhere, 1);
    assert!(!b.is_healthy(0), "the refusing server is evicted");
    assert_eq!(ok.requests.load(Ordering::SeqCst), 1);
    d.run_for(&mut b, &mut sink, Duration::from_millis(50));
    assert_eq!((b.inflight(0), b.inflight(1)), (0, 0));
}

#[test]
fn issue14_http_500_before_the_first_token_is_retried_on_another_server() {
    let bad = Fake::start(Behaviour::Status500);
    let ok = good();
    let mut cfg = config(&[&bad.url, &ok.url]);
    cfg.route = Route::LeastOutstanding;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(5), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    assert_eq!(sink.get(1).error, None);
    assert_eq!(sink.get(1).tokens, 5);
    assert_eq!(bad.requests.load(Ordering::SeqCst), 1);
    assert_eq!(b.llama_stats().retried_elsewhere, 1);
}

#[test]
fn issue14_without_retries_or_after_tokens_the_stream_fails_as_before() {
    // Retries off: the refused connection is the stream's 502.
    let ok = good();
    let dead = dead_url();
    let mut cfg = config(&[&dead, &ok.url]);
    cfg.route = Route::LeastOutstanding;
    cfg.retries_max = 0;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(5), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    assert_eq!(sink.get(1).error.map(|e| e.0), Some(502));
    // Every server fails: the budget ends it with one 502.
    let a = Fake::start(Behaviour::Status500);
    let c = Fake::start(Behaviour::Status500);
    let mut cfg = config(&[&a.url, &c.url]);
    cfg.route = Route::LeastOutstanding;
    let mut b = backend(cfg);
    // Each backend has its own ring: the previous one's spares complete
    // on the old ring, never as the new backend's slot 0.
    let mut d = Driver::new().unwrap();
    d.start(&mut b, 2, params(5), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(2)));
    assert_eq!(sink.get(2).error.map(|e| e.0), Some(502));
    assert_eq!(a.requests.load(Ordering::SeqCst) + c.requests.load(Ordering::SeqCst), 2);
    // Tokens already sent and failover off: not retried.
    let mid = Fake::start(Behaviour::CloseMidStream { tokens: 2 });
    let ok = good();
    let mut cfg = config(&[&mid.url, &ok.url]);
    cfg.route = Route::LeastOutstanding;
    cfg.failover = false;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    d.start(&mut b, 3, params(5), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(3)));
    let r = sink.get(3);
    assert_eq!((r.tokens, r.error.as_ref().map(|e| e.0)), (2, Some(502)));
    assert_eq!(ok.requests.load(Ordering::SeqCst), 0);
}
