//! Connections opened ahead of requests (issue 12): against a server that
//! closes its connection after every stream, as llama-server does, each
//! request finds a connected socket; a spare the server closes while idle
//! is replaced, and no request fails for it.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::{FinishReason, Params};
use cnse_llama::standin::{Standin, StandinConfig};
use cnse_llama::testing::{Driver, Recorder};
use cnse_llama::LlamaBackend;
use common::{backend, config, Behaviour, Fake};

const BOUND: Duration = Duration::from_secs(5);

fn params(n: u32) -> Params {
    Params {
        max_tokens: n,
        ..Params::default()
    }
}

/// Turns the loop until `done` holds for the backend, within [`BOUND`].
fn run_until_backend(d: &mut Driver, b: &mut LlamaBackend, sink: &mut Recorder, done: impl Fn(&LlamaBackend) -> bool) {
    let end = Instant::now() + BOUND;
    while !done(b) {
        assert!(
            Instant::now() < end,
            "not reached within {BOUND:?}: {:?}",
            b.llama_stats()
        );
        d.run_for(b, sink, Duration::from_millis(10));
    }
}

#[test]
fn issue12_requests_to_a_server_that_closes_after_each_stream_find_a_connection_ahead() {
    let standin = Standin::start(StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::ZERO,
        close_after_stream: true,
    })
    .unwrap();
    let url = standin.url();
    let mut cfg = config(&[&url]);
    cfg.health_interval = Duration::from_secs(60);
    // One place, as for a llama-server with -np 1: the spare has a slot of
    // its own beside the stream's.
    cfg.inflight_per_backend = 1;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.llama_stats().spares_opened == 1);
    let n = 10;
    for id in 1..=n {
        d.start(&mut b, id, params(4), "hello").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
        let r = sink.get(id);
        assert_eq!(r.error, None, "request {id}");
        assert_eq!(r.tokens, 4, "request {id}");
        assert_eq!(r.end, Some(FinishReason::Length), "request {id}");
        // The one place comes back once the answer is drained.
        run_until_backend(&mut d, &mut b, &mut sink, |b| b.inflight(0) == 0);
    }
    // Each request took a connection opened ahead of it, and its
    // replacement was opened while it was served.
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.llama_stats().spares_opened == n + 1);
    let st = b.llama_stats();
    assert_eq!(st.spares_taken, n, "{st:?}");
    assert_eq!(st.retried, 0, "no request was sent on a closed connection: {st:?}");
    assert_eq!(st.reused, 0, "{st:?}");
    // The server saw no connection but the spares and the health check
    // (its accept thread may count the last one a moment later).
    run_until_backend(&mut d, &mut b, &mut sink, |b| {
        let st = b.llama_stats();
        standin.connections() == st.spares_opened + st.health_checks
    });
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.inflight(0) == 0);
}

#[test]
fn issue12_without_spares_each_request_connects_on_its_own() {
    let standin = Standin::start(StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::ZERO,
        close_after_stream: true,
    })
    .unwrap();
    let url = standin.url();
    let mut cfg = config(&[&url]);
    cfg.health_interval = Duration::from_secs(60);
    cfg.spare_conns = 0;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for id in 1..=3 {
        d.start(&mut b, id, params(4), "hello").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
        assert_eq!(sink.get(id).error, None);
    }
    let st = b.llama_stats();
    assert_eq!((st.spares_opened, st.spares_taken), (0, 0), "{st:?}");
}

#[test]
fn issue12_a_spare_closed_by_the_server_is_replaced_and_no_request_fails() {
    let fake = Fake::start(Behaviour::IdleClose {
        tokens: 3,
        idle: Duration::from_millis(200),
    });
    let mut cfg = config(&[&fake.url]);
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for id in 1..=3 {
        // Wait until the server has closed another idle connection.
        let closed = b.llama_stats().idle_closed;
        run_until_backend(&mut d, &mut b, &mut sink, |b| b.llama_stats().idle_closed > closed);
        d.start(&mut b, id, params(3), "x").unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
        let r = sink.get(id);
        assert_eq!(r.error, None, "request {id}");
        assert_eq!(r.text(), "t0 t1 t2 ", "request {id}");
    }
    let st = b.llama_stats();
    assert!(st.idle_closed >= 3 && st.spares_opened >= 3, "replaced: {st:?}");
    assert!(b.is_healthy(0), "an idle close is not a failure");
    // Every place is given back once the last answer is drained.
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.inflight(0) == 0);
}

#[test]
fn issue12_a_spare_closed_as_the_request_goes_out_is_retried_invisibly() {
    let fake = Fake::start(Behaviour::DropFirst {
        tokens: 2,
        dropped: Arc::new(AtomicBool::new(false)),
    });
    let mut cfg = config(&[&fake.url]);
    cfg.health_interval = Duration::from_secs(60);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.llama_stats().spares_opened == 1);
    d.start(&mut b, 1, params(2), "x").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    let r = sink.get(1);
    assert_eq!(r.error, None);
    assert_eq!(r.text(), "t0 t1 ");
    let st = b.llama_stats();
    assert_eq!((st.spares_taken, st.retried), (1, 1), "{st:?}");
    assert_eq!(fake.requests.load(Ordering::SeqCst), 2);
    assert!(b.is_healthy(0));
}

#[test]
fn issue12_spares_over_all_cores_stay_within_the_process_cap() {
    use cnse_backend::Backend as _;
    let standin = Standin::start(StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::ZERO,
        close_after_stream: true,
    })
    .unwrap();
    let url = standin.url();
    let mut cfg = config(&[&url]);
    cfg.health_interval = Duration::from_secs(60);
    cfg.spare_conns = 1;
    cfg.spares_max = 2;
    // Four cores of one process, each with its own ring.
    let factory = cnse_llama::LlamaFactory::new(cfg).unwrap();
    let mut cores: Vec<(Driver, LlamaBackend, Recorder)> = (0..4)
        .map(|_| (Driver::new().unwrap(), factory.backend(), Recorder::default()))
        .collect();
    let turn_all = |cores: &mut Vec<(Driver, LlamaBackend, Recorder)>| {
        for (d, b, s) in cores.iter_mut() {
            d.run_for(b, s, Duration::from_millis(5));
        }
    };
    let opened = |cores: &Vec<(Driver, LlamaBackend, Recorder)>| -> u64 {
        cores.iter().map(|(_, b, _)| b.llama_stats().spares_opened).sum()
    };
    let end = Instant::now() + BOUND;
    while opened(&cores) < 2 {
        assert!(Instant::now() < end, "two spares were not opened");
        turn_all(&mut cores);
    }
    // Well past the time the other cores would have opened theirs.
    for _ in 0..20 {
        turn_all(&mut cores);
    }
    assert_eq!(
        opened(&cores),
        2,
        "four cores with one spare each, at most two in the process"
    );
    for (_, b, _) in &cores {
        assert_eq!(b.stats().spares, 2, "every core reports the process's spares");
    }
    // Requests on every core: each finishes, and the spares in the process
    // never exceed the cap while they come and go.
    for (k, (d, b, s)) in cores.iter_mut().enumerate() {
        let id = k as u64 + 1;
        d.start(b, id, params(4), "hello").unwrap();
        assert!(d.run_until(b, s, BOUND, |s| s.finished(id)));
        assert_eq!(s.get(id).error, None, "request {id}");
        assert_eq!(s.get(id).tokens, 4, "request {id}");
    }
    for _ in 0..20 {
        turn_all(&mut cores);
        let spares = cores.iter().map(|(_, b, _)| b.stats().spares).max().unwrap();
        assert!(spares <= 2, "{spares} spares in the process");
    }
    // A core that goes away gives its spares back to the others.
    let holder = cores
        .iter()
        .position(|(_, b, _)| b.llama_stats().spares_opened > b.llama_stats().spares_taken)
        .expect("a core holds a spare");
    cores.remove(holder);
    let before = opened(&cores);
    let end = Instant::now() + BOUND;
    loop {
        turn_all(&mut cores);
        if opened(&cores) > before {
            break;
        }
        assert!(Instant::now() < end, "no other core took the freed spare");
    }
    assert!(cores[0].1.stats().spares <= 2);
}

#[test]
fn issue12_spares_and_streams_stay_within_the_servers_places_plus_one() {
    use cnse_backend::Backend as _;
    let standin = Standin::start(StandinConfig {
        ttft: Duration::from_millis(200),
        token_interval: Duration::ZERO,
        close_after_stream: true,
    })
    .unwrap();
    let url = standin.url();
    let mut cfg = config(&[&url]);
    cfg.health_interval = Duration::from_secs(60);
    cfg.first_token_timeout = Duration::from_secs(5);
    cfg.inflight_per_backend = 2;
    cfg.spare_conns = 2;
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    // One spare until the server is seen closing after a stream; then two
    // (two free places: a burst of two finds two connections).
    d.start(&mut b, 1, params(2), "hello").unwrap();
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(1)));
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.stats().spares == 2);
    let taken = b.llama_stats().spares_taken;
    d.start(&mut b, 2, params(2), "hello").unwrap();
    d.start(&mut b, 3, params(2), "hello").unwrap();
    assert_eq!(b.llama_stats().spares_taken, taken + 2, "both found a connection ahead");
    // Spares + streams within the two places + 1 all along.
    let mut both_busy = 0;
    while !sink.finished(2) || !sink.finished(3) {
        d.run_for(&mut b, &mut sink, Duration::from_millis(5));
        let (spares, streams) = (b.stats().spares, b.inflight(0) as u64);
        assert!(
            spares + streams <= 3,
            "{spares} spares beside {streams} streams on two places"
        );
        both_busy += u32::from(streams == 2);
    }
    assert!(both_busy > 0, "the two streams ran together");
    assert_eq!((sink.get(2).error, sink.get(3).error), (None, None));
    run_until_backend(&mut d, &mut b, &mut sink, |b| b.stats().spares == 2);
}
