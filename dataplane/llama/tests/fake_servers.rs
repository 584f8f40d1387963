//! The llama backend on the real io_uring against fake llama-servers that
//! behave, misbehave, hang and die: every stream ends with exactly one END
//! or ERROR in bounded time, and the others are not disturbed.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cnse_backend::{Backend, FinishReason, Params};
use cnse_llama::testing::{Driver, Recorder};
use common::{backend, config, dead_url, Behaviour, Fake};

fn params(n: u32) -> Params {
    Params {
        max_tokens: n,
        ..Params::default()
    }
}

const BOUND: Duration = Duration::from_secs(5);

#[test]
fn streams_tokens_then_end_and_reuses_the_connection() {
    let fake = Fake::start(Behaviour::Tokens {
        tokens: 5,
        delay: Duration::ZERO,
    });
    let mut b = backend(config(&[&fake.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for id in 1..=3 {
        d.start(&mut b, id, params(5), "hello").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
        let r = sink.get(id);
        assert_eq!(r.text(), "t0 t1 t2 t3 t4 ");
        assert_eq!(r.tokens, 5);
        assert_eq!(r.end, Some(FinishReason::Length));
        assert_eq!(r.error, None);
        // Let the drain finish so the connection is back in the pool.
        d.run_for(&mut b, &mut sink, Duration::from_millis(30));
    }
    assert_eq!(b.stats().started, 3);
    assert_eq!(b.stats().active, 0);
    // The first request connected; the others found a connection ready:
    // the pooled one, or the spare opened ahead beside it.
    let st = b.llama_stats();
    assert_eq!(st.reused + st.spares_taken, 2, "{st:?}");
    assert_eq!(b.inflight(0), 0);
    // Health checks use their own connections; completions used two.
    assert_eq!(fake.requests.load(Ordering::SeqCst), 3);
    assert_eq!(
        fake.connections.load(Ordering::SeqCst) as u64,
        2 + st.health_checks,
        "{st:?}"
    );
    assert!(sink.streams.values().all(|r| r.after_end == 0));
}

#[test]
fn unreachable_backend_is_502_and_marked_down() {
    let url = dead_url();
    let mut b = backend(config(&[&url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let t0 = Instant::now();
    d.start(&mut b, 1, params(5), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let (code, msg) = sink.get(1).error.expect("an error");
    assert_eq!(code, 502, "{msg}");
    assert!(msg.contains("connect") && msg.contains(&url), "{msg}");
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert!(!b.is_healthy(0));
    // While it is down, new work is refused at once rather than queued.
    assert!(b.has_capacity());
    let rej = d.start(&mut b, 2, params(5), "x").unwrap_err();
    assert_eq!(rej.code, 502, "{rej:?}");
    d.run_for(&mut b, &mut sink, Duration::from_millis(30));
    assert_eq!(b.inflight(0), 0, "the place is released once the socket is closed");
}

#[test]
fn garbage_answer_is_502() {
    let fake = Fake::start(Behaviour::Garbage);
    let mut cfg = config(&[&fake.url]);
    // Its /health says 200: with frequent checks it would be readmitted
    // at once.
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    // The first health check (at the first poll) passes before the request.
    d.run_for(&mut b, &mut sink, Duration::from_millis(100));
    assert_eq!(b.llama_stats().health_checks, 1);
    assert!(b.is_healthy(0));
    d.start(&mut b, 1, params(5), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let (code, msg) = sink.get(1).error.unwrap();
    assert_eq!(code, 502);
    assert!(msg.contains("bad HTTP response"), "{msg}");
    assert!(!b.is_healthy(0));
}

#[test]
fn http_500_is_502_with_the_servers_message() {
    let fake = Fake::start(Behaviour::Status500);
    let mut b = backend(config(&[&fake.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(5), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let (code, msg) = sink.get(1).error.unwrap();
    assert_eq!(code, 502);
    assert!(msg.contains("HTTP 500") && msg.contains("boom"), "{msg}");
}

#[test]
fn http_400_fails_the_stream_but_keeps_the_server() {
    let fake = Fake::start(Behaviour::Status400);
    let mut cfg = config(&[&fake.url]);
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(5), "a very long prompt").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let (code, msg) = sink.get(1).error.unwrap();
    assert_eq!(code, 502);
    assert!(
        msg.contains("HTTP 400") && msg.contains("exceeds the available context size"),
        "{msg}"
    );
    assert!(
        b.is_healthy(0),
        "a request the server refuses says nothing about its health"
    );
    assert_eq!(b.llama_stats().evicted, 0);
}

#[test]
fn killed_mid_stream_is_502_after_the_tokens_sent() {
    let fake = Fake::start(Behaviour::CloseMidStream { tokens: 3 });
    let mut b = backend(config(&[&fake.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(50), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let r = sink.get(1);
    assert_eq!(r.tokens, 3);
    let (code, msg) = r.error.unwrap();
    assert_eq!(code, 502);
    assert!(msg.contains("mid-stream after 3 tokens"), "{msg}");
    assert_eq!(r.end, None);
}

#[test]
fn hanging_backend_is_504_within_the_first_token_timeout() {
    let fake = Fake::start(Behaviour::Hang);
    let cfg = config(&[&fake.url]);
    let limit = cfg.first_token_timeout;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let t0 = Instant::now();
    d.start(&mut b, 1, params(5), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let (code, msg) = sink.get(1).error.unwrap();
    assert_eq!(code, 504, "{msg}");
    let took = t0.elapsed();
    assert!(took >= limit && took < limit + Duration::from_secs(1), "{took:?}");
    d.run_for(&mut b, &mut sink, Duration::from_millis(50));
    assert_eq!(b.inflight(0), 0, "the place is released once the connection is closed");
}

#[test]
fn cancel_closes_the_backend_connection() {
    let fake = Fake::start(Behaviour::Tokens {
        tokens: 200,
        delay: Duration::from_millis(10),
    });
    let mut b = backend(config(&[&fake.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(200), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.get(1).tokens >= 3));
    d.cancel(&mut b, 1);
    assert_eq!(b.stats().cancelled, 1);
    assert_eq!(b.stats().active, 0);
    // The fake sees its writes fail: generation stopped on its side.
    assert!(d.run_until(&mut b, &mut sink, BOUND, |_| fake.aborted.load(Ordering::SeqCst) == 1));
    let r = sink.get(1);
    assert!(
        r.end.is_none() && r.error.is_none(),
        "no END or ERROR after a cancel: {r:?}"
    );
    assert!(r.tokens < 200);
    assert_eq!(b.inflight(0), 0);
    // The slot is usable again, on a fresh connection.
    d.start(&mut b, 2, params(200), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(10), |s| s.finished(2)));
    assert_eq!(sink.get(2).tokens, 200);
    assert_eq!(b.llama_stats().reused, 0);
}

#[test]
fn pause_stops_reading_and_resume_delivers_the_rest() {
    let fake = Fake::start(Behaviour::Tokens {
        tokens: 40,
        delay: Duration::from_millis(1),
    });
    let mut b = backend(config(&[&fake.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    sink.credit.insert(cnse_backend::WorkId(1), 5);
    d.start(&mut b, 1, params(40), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.get(1).tokens >= 5));
    // Longer than the idle timeout: a paused stream does not time out.
    d.run_for(&mut b, &mut sink, Duration::from_millis(1000));
    assert_eq!(sink.get(1).tokens, 5, "nothing delivered past the credit while paused");
    assert_eq!(b.stats().paused, 1);
    assert!(!sink.finished(1));
    sink.credit.insert(cnse_backend::WorkId(1), 1000);
    d.resume(&mut b, 1);
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let r = sink.get(1);
    assert_eq!(r.tokens, 40);
    assert_eq!(r.end, Some(FinishReason::Length));
    let want: String = (0..40).map(|k| format!("t{k} ")).collect();
    assert_eq!(r.text(), want);
}

#[test]
fn least_outstanding_routing_and_inflight_limit() {
    let slow = Behaviour::Tokens {
        tokens: 30,
        delay: Duration::from_millis(20),
    };
    let a = Fake::start(slow.clone());
    let c = Fake::start(slow);
    let mut cfg = config(&[&a.url, &c.url]);
    cfg.inflight_per_backend = 2;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for id in 1..=4 {
        assert!(b.has_capacity());
        d.start(&mut b, id, params(30), "x").unwrap();
    }
    assert_eq!((b.inflight(0), b.inflight(1)), (2, 2));
    assert!(!b.has_capacity(), "both servers are full");
    let rej = d.start(&mut b, 5, params(30), "x").unwrap_err();
    assert_eq!(rej.code, 429);
    assert!(d.run_until(&mut b, &mut sink, Duration::from_secs(10), |s| s.all_finished(1..=4)));
    for id in 1..=4 {
        assert_eq!(sink.get(id).tokens, 30);
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 2);
    assert_eq!(c.requests.load(Ordering::SeqCst), 2);
    d.run_for(&mut b, &mut sink, Duration::from_millis(50));
    assert!(b.has_capacity());
}

#[test]
fn health_checks_evict_and_readmit() {
    let fast = Behaviour::Tokens {
        tokens: 2,
        delay: Duration::ZERO,
    };
    let a = Fake::start(fast.clone());
    let c = Fake::start(fast);
    let mut b = backend(config(&[&a.url, &c.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    a.healthy.store(false, Ordering::SeqCst);
    let mut waited = 0;
    while b.is_healthy(0) && waited < 30 {
        d.run_for(&mut b, &mut sink, Duration::from_millis(100));
        waited += 1;
    }
    assert!(!b.is_healthy(0), "/health 503 evicts");
    assert!(b.is_healthy(1));
    for id in 1..=4 {
        d.start(&mut b, id, params(2), "x").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
    }
    assert_eq!(a.requests.load(Ordering::SeqCst), 0, "an evicted server gets no work");
    a.healthy.store(true, Ordering::SeqCst);
    let mut waited = 0;
    while !b.is_healthy(0) && waited < 30 {
        d.run_for(&mut b, &mut sink, Duration::from_millis(100));
        waited += 1;
    }
    assert!(b.is_healthy(0), "/health 200 readmits");
    assert!(b.llama_stats().evicted >= 1 && b.llama_stats().readmitted >= 1);
}

#[test]
fn a_pooled_connection_closed_by_the_server_is_replaced_before_a_request_uses_it() {
    let fake = Fake::start(Behaviour::TokensThenClose { tokens: 2 });
    let mut cfg = config(&[&fake.url]);
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.start(&mut b, 1, params(2), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    // The fake closes ~50 ms after its answer: the pooled connection's
    // watching RECV sees it, and a spare takes its place.
    d.run_for(&mut b, &mut sink, Duration::from_millis(150));
    assert!(b.llama_stats().idle_closed >= 1, "{:?}", b.llama_stats());
    for id in 2..=3 {
        d.start(&mut b, id, params(2), "x").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
        let r = sink.get(id);
        assert_eq!(r.error, None);
        assert_eq!(r.end, Some(FinishReason::Stop));
        d.run_for(&mut b, &mut sink, Duration::from_millis(150));
    }
    // No request went out on the closed connection (none was re-sent),
    // and after the first close (right after an answer, as llama-server
    // b10434 does after every stream) its connections are not pooled:
    // each request took a spare connected ahead.
    let st = b.llama_stats();
    assert_eq!((st.reused, st.retried), (0, 0), "{st:?}");
    assert_eq!(st.spares_taken, 2, "{st:?}");
    assert!(b.is_healthy(0));
}

#[test]
fn a_failure_on_one_server_leaves_the_others_streaming() {
    let good = Fake::start(Behaviour::Tokens {
        tokens: 20,
        delay: Duration::from_millis(5),
    });
    let bad = Fake::start(Behaviour::CloseMidStream { tokens: 2 });
    let mut cfg = config(&[&good.url, &bad.url]);
    // The bad one's /health says 200: no health check may readmit it
    // during the test (the first ones pass before the requests).
    cfg.health_interval = Duration::from_secs(60);
    // The failed stream ends with its 502 (failover would continue it on
    // the good server: tests/failover.rs).
    cfg.failover = false;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    d.run_for(&mut b, &mut sink, Duration::from_millis(100));
    d.start(&mut b, 1, params(20), "x").unwrap();
    d.start(&mut b, 2, params(20), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.all_finished([1, 2])));
    let (ok, failed) = if sink.get(1).error.is_none() { (1, 2) } else { (2, 1) };
    assert_eq!(sink.get(ok).tokens, 20);
    assert_eq!(sink.get(ok).end, Some(FinishReason::Length));
    assert_eq!(sink.get(failed).error.as_ref().unwrap().0, 502);
    // New work goes to the healthy one.
    d.start(&mut b, 3, params(20), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(3)));
    assert_eq!(sink.get(3).end, Some(FinishReason::Length));
}
