//! Issue 14, session affinity (`Route::Session`): a keyed stream goes to
//! the server its key is pinned to while that server is within the load
//! factor; past it, it goes to the least-loaded server and the key moves
//! there, and stays.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use cnse_backend::Params;
use cnse_llama::testing::{Driver, Recorder};
use cnse_llama::Route;
use common::{backend, config, Behaviour, Fake};

const BOUND: Duration = Duration::from_secs(10);

fn params(n: u32) -> Params {
    Params {
        max_tokens: n,
        ..Params::default()
    }
}

#[test]
fn issue14_a_session_stays_on_its_server_until_too_loaded_then_moves_and_stays() {
    let slow = || {
        Fake::start(Behaviour::Tokens {
            tokens: 4,
            delay: Duration::from_millis(100),
        })
    };
    let (s0, s1) = (slow(), slow());
    let mut cfg = config(&[&s0.url, &s1.url]);
    cfg.route = Route::Session;
    cfg.first_token_timeout = Duration::from_secs(5);
    cfg.idle_token_timeout = Duration::from_secs(5);
    let mut b = backend(cfg);
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    let key = Some("conv-1");
    let served = || (s0.requests.load(Ordering::SeqCst), s1.requests.load(Ordering::SeqCst));
    // Prompts share nothing (and are shorter than a prefix block): only
    // the key ties them together. Turn 1 goes least-outstanding (server
    // 0) and pins the key; turn 2, at once, finds server 0 at 1 in flight
    // against 0: (1 + 1) <= 2 x (0 + 1), within the factor, so it stays.
    d.start_keyed(&mut b, 1, params(4), "first question", key).unwrap();
    d.start_keyed(&mut b, 2, params(4), "second, unrelated", key).unwrap();
    assert_eq!((b.inflight(0), b.inflight(1)), (2, 0));
    // A third while both run: (2 + 1) > 2 x (0 + 1): the idle server
    // takes it, and the key moves there.
    d.start_keyed(&mut b, 3, params(4), "a third one", key).unwrap();
    assert_eq!((b.inflight(0), b.inflight(1)), (2, 1));
    // A request without a key is not pinned anywhere: least-outstanding.
    d.start(&mut b, 4, params(4), "no key at all").unwrap();
    assert_eq!((b.inflight(0), b.inflight(1)), (2, 2));
    assert!(d.run_until(&mut b, &mut sink, BOUND, |s| (1..=4).all(|id| s.finished(id))));
    assert_eq!(served(), (2, 2));
    // Later turns stay on the server the key moved to.
    for id in 5..=7 {
        d.start_keyed(&mut b, id, params(4), &format!("turn {id}"), key)
            .unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
    }
    assert_eq!(served(), (2, 5));
    for id in 1..=7 {
        assert_eq!(sink.get(id).error, None, "stream {id}");
        assert_eq!(sink.get(id).tokens, 4, "stream {id}");
    }
    // Turns 2, 5, 6, 7 went to their pin.
    assert_eq!(b.llama_stats().session_routed, 4);
}

#[test]
fn issue14_keys_are_ignored_by_the_prefix_route() {
    let fast = || {
        Fake::start(Behaviour::Tokens {
            tokens: 2,
            delay: Duration::ZERO,
        })
    };
    let (s0, s1) = (fast(), fast());
    let mut b = backend(config(&[&s0.url, &s1.url]));
    let mut d = Driver::new().unwrap();
    let mut sink = Recorder::default();
    for id in 1..=4 {
        d.start_keyed(&mut b, id, params(2), &format!("{id} unrelated"), Some("conv"))
            .unwrap();
        assert!(d.run_until(&mut b, &mut sink, BOUND, |s| s.finished(id)));
    }
    // Least-outstanding in turn: both servers used, nothing pinned.
    assert_eq!(
        (s0.requests.load(Ordering::SeqCst), s1.requests.load(Ordering::SeqCst)),
        (2, 2)
    );
    assert_eq!(b.llama_stats().session_routed, 0);
}
