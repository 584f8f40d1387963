//! Issue 11, fault and bad-input suite: hostile and garbage connections
//! beside good streams, and slowloris, against the real binary on loopback.
//! Every good stream gets exactly the tokens of a clean run, the good
//! streams' p99 stays within 2× of a clean run measured in the same test,
//! every hostile connection gets what the protocol page says, and the
//! server ends where it started. The hostile faults are in `hostile/`.

mod common;
mod hostile;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::fault::{percentile, seed, Footprint, Rng, RSS_SLACK_KIB};
use common::*;
use hostile::FAULTS;

const GOOD_CLIENTS: u64 = 10;
/// Streams per good client per phase, one after another.
const GOOD_STREAMS: u64 = 6;
const GOOD_TOKENS: u32 = 100;
const HOSTILE_CONNS: u64 = 100;
/// Clean and hostile phases alternate this many times; the p99s compared
/// are the medians over the rounds.
const ROUNDS: usize = 3;

fn good_params(client: u64, i: u64) -> Params {
    Params {
        max_tokens: GOOD_TOKENS,
        seed: client * 1_000 + i,
        ..Params::default()
    }
}

/// One phase of the good clients: each streams its requests one after
/// another on its own connection (odd clients with a 16-token credit
/// window, even ones unlimited). Returns every stream's text in a fixed
/// order, every stream's end-to-end time (REQUEST written to END read) and
/// time to first token.
fn good_phase(addr: SocketAddr) -> (Vec<Vec<u8>>, Vec<Duration>, Vec<Duration>) {
    let handles: Vec<_> = (0..GOOD_CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let (mut cl, _) = Client::connect_hello(addr, b"", WAIT).expect("a good client connects");
                let mut out = Vec::new();
                for i in 0..GOOD_STREAMS {
                    let credit = if c % 2 == 1 { 16 } else { 0 };
                    let prompt = format!("good client {c} stream {i}");
                    let g = cl
                        .generate(i + 1, credit, &good_params(c, i), &prompt, |_, _| {})
                        .unwrap_or_else(|e| panic!("good client {c} stream {i}: {e}"));
                    assert_eq!(
                        (g.tokens, g.end_tokens, g.reason),
                        (u64::from(GOOD_TOKENS), u64::from(GOOD_TOKENS), FinishReason::Length),
                        "good client {c} stream {i}"
                    );
                    let ttft = g.client_ttft.expect("a stream of 100 tokens has a first");
                    out.push((g.text, g.client_total, ttft));
                }
                out
            })
        })
        .collect();
    let (mut texts, mut times, mut ttfts) = (Vec::new(), Vec::new(), Vec::new());
    for (c, h) in handles.into_iter().enumerate() {
        let streams = h
            .join()
            .unwrap_or_else(|_| panic!("good client {c} failed (its panic is above)"));
        for (text, time, ttft) in streams {
            texts.push(text);
            times.push(time);
            ttfts.push(ttft);
        }
    }
    (texts, times, ttfts)
}

/// What the hostile connections did: cycles per fault, and every outcome
/// that differs from the protocol page.
#[derive(Default)]
struct Tally {
    cycles: Vec<u64>,
    failures: Vec<String>,
}

/// `HOSTILE_CONNS` connections, each one thread that runs a random fault,
/// checks the server's answer, pauses 20-80 ms and starts again on a new
/// connection, until stopped.
struct Hostile {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<()>>,
    tally: Arc<Mutex<Tally>>,
}

impl Hostile {
    fn start(addr: SocketAddr, seed: u64, round: usize) -> Hostile {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally {
            cycles: vec![0; FAULTS.len()],
            failures: Vec::new(),
        }));
        let handles = (0..HOSTILE_CONNS)
            .map(|id| {
                let (stop, tally) = (stop.clone(), tally.clone());
                let mut rng = Rng::new(seed ^ ((round as u64) << 40) ^ (id + 1).wrapping_mul(0x1000_0000_01b3));
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let k = rng.range(0, FAULTS.len() as u64) as usize;
                        let (name, fault) = FAULTS[k];
                        let r = fault(addr, &mut rng);
                        let mut t = tally.lock().unwrap();
                        t.cycles[k] += 1;
                        if let Err(e) = r {
                            t.failures.push(format!("connection {id}, {name}: {e}"));
                        }
                        drop(t);
                        std::thread::sleep(Duration::from_millis(rng.range(20, 80)));
                    }
                })
            })
            .collect();
        Hostile { stop, handles, tally }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.join().expect("a hostile connection's thread panicked");
        }
        Arc::try_unwrap(self.tally)
            .ok()
            .expect("every thread joined")
            .into_inner()
            .unwrap()
    }
}

#[test]
fn issue11_hostile_connections_beside_good_streams_lose_and_slow_nothing() {
    raise_nofile(20_000);
    let seed = seed("issue11_hostile_connections_beside_good_streams_lose_and_slow_nothing");
    let mut args = vec!["--stats-interval-ms", "100"];
    let pace = synthetic(1_000, 2_000);
    args.extend(strs(&pace));
    let mut s = Server::start(&args);
    // The first clean phase's tokens are the reference; the baseline comes
    // after the first round (clean and hostile), a warm-up of everything
    // the test does.
    let (reference, _, _) = good_phase(s.addr);
    let mut base = None;

    let (mut clean_p99, mut hostile_p99) = (Vec::new(), Vec::new());
    // Time to first token: printed, not asserted (1 ms of synthetic TTFT is
    // within the scheduling noise of a shared 2-core machine).
    let (mut clean_ttft, mut hostile_ttft) = (Vec::new(), Vec::new());
    let mut cycles = vec![0u64; FAULTS.len()];
    for round in 0..ROUNDS {
        let (texts, mut times, mut ttfts) = good_phase(s.addr);
        assert!(
            texts == reference,
            "round {round}: a clean run's tokens differ from the first"
        );
        clean_p99.push(percentile(&mut times, 99.0));
        clean_ttft.push(percentile(&mut ttfts, 99.0));

        let hostile = Hostile::start(s.addr, seed, round);
        // Let every hostile connection get going before the good streams.
        std::thread::sleep(Duration::from_millis(300));
        let (texts, mut times, mut ttfts) = good_phase(s.addr);
        let tally = hostile.finish();
        hostile_ttft.push(percentile(&mut ttfts, 99.0));
        for (i, t) in texts.iter().enumerate() {
            assert!(
                *t == reference[i],
                "round {round}: good stream {i} got other tokens beside hostile connections (seed {seed})"
            );
        }
        hostile_p99.push(percentile(&mut times, 99.0));
        assert!(
            tally.failures.is_empty(),
            "round {round} (seed {seed}): {} hostile outcomes differ from the page, first: {:?}",
            tally.failures.len(),
            &tally.failures[..tally.failures.len().min(5)]
        );
        for (c, n) in cycles.iter_mut().zip(&tally.cycles) {
            *c += n;
        }
        assert!(s.alive(), "the server died (seed {seed})");
        if round == 0 {
            base = Some(Footprint::at_rest(&s, WAIT).unwrap());
        }
    }
    let base = base.expect("a first round");
    let summary: Vec<String> = FAULTS
        .iter()
        .zip(&cycles)
        .map(|((name, _), n)| format!("{name}={n}"))
        .collect();
    eprintln!("hostile cycles: {}", summary.join(" "));
    assert!(cycles.iter().all(|&n| n > 0), "a fault never ran: {summary:?}");

    // p99 of the good streams' end-to-end time, median over the rounds.
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    eprintln!(
        "good streams' TTFT p99: clean {:?}, beside hostile {:?} (medians over rounds)",
        median(&mut clean_ttft),
        median(&mut hostile_ttft)
    );
    let (clean, hostile) = (median(&mut clean_p99), median(&mut hostile_p99));
    let ratio = hostile.as_secs_f64() / clean.as_secs_f64();
    eprintln!(
        "good streams' end-to-end p99: clean {clean_p99:?}, beside hostile {hostile_p99:?}; medians {clean:?} / {hostile:?}, ratio {ratio:.2}"
    );
    assert!(
        ratio <= 2.0,
        "good p99 {hostile:?} beside hostile connections is {ratio:.2}× the clean {clean:?} (seed {seed})"
    );

    // Nothing left behind.
    let after = Footprint::at_rest(&s, WAIT).unwrap();
    base.assert_back("hostile rounds 2 and 3", after, RSS_SLACK_KIB);
    let g = s
        .client()
        .generate(1, 0, &params(8), "still serving", |_, _| {})
        .unwrap();
    assert_eq!(g.tokens, 8);
}

#[test]
fn issue11_slowloris_hello_at_one_byte_a_second_is_closed_at_the_handshake_timeout() {
    const SLOW: usize = 20;
    let timeout = Duration::from_millis(2_000);
    let mut args = vec!["--handshake-timeout-ms", "2000", "--stats-interval-ms", "100"];
    let pace = synthetic(0, 2_000);
    args.extend(strs(&pace));
    let s = Server::start(&args);
    let reference = s.client().generate(1, 0, &params(200), "bystander", |_, _| {}).unwrap();
    let base = Footprint::at_rest(&s, WAIT).unwrap();

    let mut hello = Vec::new();
    cnse_proto::put_hello(&mut hello, b"");
    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let addr = s.addr;
            let hello = hello.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut c = Client::connect(addr, WAIT).expect("connect");
                let mut w = c.writer().expect("a second handle");
                let drip = std::thread::spawn(move || {
                    // One byte a second until the server closes (the write
                    // then fails) or the HELLO is out.
                    for b in &hello {
                        if w.write_raw(std::slice::from_ref(b)).is_err() {
                            return;
                        }
                        std::thread::sleep(Duration::from_secs(1));
                    }
                });
                let frames = c.read_until_closed(Duration::from_secs(30));
                let waited = t.elapsed();
                drip.join().unwrap();
                let frames = frames.unwrap_or_else(|e| panic!("slowloris {i}: not closed: {e}"));
                (frames, waited)
            })
        })
        .collect();
    // Meanwhile a bystander streams and new clients are served.
    let mut streams = 0;
    let t = Instant::now();
    let mut by = s.client();
    while t.elapsed() < timeout + Duration::from_millis(500) {
        let g = by.generate(1, 0, &params(200), "bystander", |_, _| {}).unwrap();
        assert!(g.text == reference.text, "the bystander's tokens changed");
        let g = s.client().generate(1, 0, &params(3), "newcomer", |_, _| {}).unwrap();
        assert_eq!(g.tokens, 3);
        streams += 1;
    }
    let mut closed_after = Vec::new();
    for (i, h) in slow.into_iter().enumerate() {
        let (frames, waited) = h.join().unwrap();
        closed_after.push(waited);
        assert!(
            frames.len() == 1 && frames[0].kind == Kind::Error && (frames[0].stream_id, frames[0].arg) == (0, 400),
            "slowloris {i}: want one ERROR 400 on stream 0, got {frames:?}"
        );
        // The sweep runs every 100 ms; the connect and the accept are not
        // the same instant.
        assert!(
            waited >= timeout - Duration::from_millis(150),
            "slowloris {i}: closed after {waited:?}"
        );
        assert!(
            waited < timeout + Duration::from_secs(3),
            "slowloris {i}: closed only after {waited:?} (a whole HELLO takes 32 s)"
        );
    }
    closed_after.sort();
    eprintln!(
        "{SLOW} slowloris connections closed after {:?} to {:?} (timeout {timeout:?}); the bystander completed {streams} × 2 streams meanwhile",
        closed_after[0],
        closed_after[SLOW - 1]
    );
    drop(by);
    let after = Footprint::at_rest(&s, WAIT).unwrap();
    base.assert_back("20 slowloris connections", after, RSS_SLACK_KIB);
}
