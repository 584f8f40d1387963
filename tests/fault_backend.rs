//! Issue 11, fault and bad-input suite: a backend killed mid-stream. Two
//! llama-server stand-ins (`cnse-dp llama-standin`: llama-server's wire
//! format at a fixed pace, its own process) behind the gateway; one is
//! SIGKILLed while 20 streams run on both. Each stream ends exactly once:
//! on the dead one with ERROR 502 after an exact prefix of its tokens, on
//! the other with END and every token; new streams are served whole; the
//! gateway's descriptors and connections return to where they were. The
//! same with a real llama-server: `llama_gateway.rs`
//! (`llama_killed_mid_stream_is_502_and_the_gateway_keeps_serving`); with
//! a rank under mpirun: `mpi_serve.rs`
//! (`issue10_a_dead_rank_fails_only_its_streams_with_502`).

mod common;

use std::time::Duration;

use cnse_proto::code;
use common::fault::{Footprint, RSS_SLACK_KIB};
use common::standin::Standin;
use common::*;

const CLIENTS: u64 = 10;
const STREAMS: u64 = 2;
const TOKENS: u32 = 200;

/// The stand-in's answer to `max_tokens` n: " tok0 tok1 ...".
fn answer(n: u32) -> Vec<u8> {
    (0..n).map(|k| format!(" tok{k}")).collect::<String>().into_bytes()
}

/// Each stream's text so far and its end: (kind, arg, message).
type Ends = Vec<Vec<Option<(Kind, u32, String)>>>;

/// Reads one frame of client `c`: a stream's tokens (odd clients grant
/// their credit back) or its one end.
fn read(c: usize, cl: &mut Client, text: &mut [Vec<Vec<u8>>], ends: &mut Ends) {
    let f = cl.next_frame_within(Duration::from_secs(20)).unwrap();
    let i = f.stream_id.wrapping_sub(1) as usize;
    assert!(i < STREAMS as usize && ends[c][i].is_none(), "client {c}: {f:?}");
    match f.kind {
        Kind::Tokens => {
            text[c][i].extend_from_slice(&f.payload);
            if c % 2 == 1 {
                cl.credit(f.stream_id, f.arg).unwrap();
            }
        }
        Kind::End | Kind::Error => ends[c][i] = Some((f.kind, f.arg, f.text())),
        _ => panic!("client {c}: {f:?}"),
    }
}

#[test]
fn issue11_a_killed_backend_fails_only_its_streams_with_502_and_the_rest_are_whole() {
    let mut doomed = Standin::start(5_000, 10_000);
    let survivor = Standin::start(5_000, 10_000);
    let urls = format!("{},{}", doomed.url, survivor.url);
    let s = Server::start(&[
        "--backend",
        "llama",
        "--llama-url",
        &urls,
        // The streams of the dead one end with 502 (with failover on they
        // would continue on the other: tests/llama_failover.rs).
        "--llama-failover",
        "off",
        "--llama-inflight",
        "16",
        "--stats-interval-ms",
        "100",
    ]);
    // Warm-up: as many streams at once as the test runs, so each backend's
    // pool of keep-alive connections (bounded by --llama-inflight) is as
    // full as it will be; then the baseline.
    let warm: Vec<_> = (0..CLIENTS * STREAMS)
        .map(|_| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut cl = Client::connect_hello(addr, b"", WAIT).unwrap().0;
                cl.generate(1, 0, &params(20), "warm", |_, _| {}).unwrap().text
            })
        })
        .collect();
    for h in warm {
        assert_eq!(h.join().unwrap(), answer(20));
    }
    let base = Footprint::at_rest(&s, WAIT).unwrap();

    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|c| {
            let mut cl = s.client();
            for id in 1..=STREAMS {
                cl.request(id, if c % 2 == 1 { 8 } else { 0 }, &params(TOKENS), "long")
                    .unwrap();
            }
            cl
        })
        .collect();
    // Every stream running (a first token each), then the kill.
    let mut text = vec![vec![Vec::new(); STREAMS as usize]; CLIENTS as usize];
    let mut ends: Ends = vec![vec![None; STREAMS as usize]; CLIENTS as usize];
    for (c, cl) in clients.iter_mut().enumerate() {
        while text[c].iter().any(Vec::is_empty) {
            read(c, cl, &mut text, &mut ends);
        }
    }
    doomed.kill();
    for (c, cl) in clients.iter_mut().enumerate() {
        while ends[c].iter().any(Option::is_none) {
            read(c, cl, &mut text, &mut ends);
        }
    }
    let whole = answer(TOKENS);
    let (mut failed, mut finished) = (0, 0);
    for c in 0..CLIENTS as usize {
        for i in 0..STREAMS as usize {
            let (kind, arg, msg) = ends[c][i].clone().unwrap();
            let t = &text[c][i];
            match kind {
                Kind::End => {
                    assert_eq!(arg, 0, "client {c} stream {}", i + 1);
                    assert!(*t == whole, "client {c} stream {}: not every token", i + 1);
                    finished += 1;
                }
                _ => {
                    assert_eq!(arg, code::BACKEND_FAILED, "client {c} stream {}: {msg}", i + 1);
                    assert!(msg.contains(&doomed.url), "the 502 names the dead backend: {msg}");
                    assert!(
                        whole.starts_with(t) && t.len() < whole.len(),
                        "client {c} stream {}: the tokens before the 502 are not a prefix",
                        i + 1
                    );
                    failed += 1;
                }
            }
        }
    }
    eprintln!("backend killed: {failed} streams ended with 502, {finished} finished whole on the other");
    assert!(failed > 0 && finished > 0, "{failed} failed, {finished} finished");
    // New streams go to the survivor, whole.
    for cl in &mut clients {
        let g = cl.generate(9, 0, &params(20), "after the kill", |_, _| {}).unwrap();
        assert_eq!(g.text, answer(20));
    }
    drop(clients);
    let after = Footprint::at_rest(&s, WAIT).unwrap();
    if after.fds > base.fds {
        let links: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", s.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect();
        eprintln!("descriptors: {links:?}");
    }
    base.assert_back("a backend killed under 20 streams", after, RSS_SLACK_KIB);
}
