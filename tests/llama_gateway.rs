//! `cnse-dp serve --backend llama` in front of a real llama-server with
//! SmolLM2-135M: what a user sees through the CNSE protocol.

mod common;
mod llama_common;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{read_stream, token_count, Kind, Params, Server};
use llama_common::{busy_slots, direct_answer, llama, RealServer};

/// CPU inference on 2 cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn greedy(n: u32) -> Params {
    Params {
        max_tokens: n,
        temperature: 0.0,
        ..Params::default()
    }
}

fn gateway(urls: &[&str]) -> Server {
    let urls = urls.join(",");
    Server::start(&["--backend", "llama", "--llama-url", &urls, "--threads", "2"])
}

const LONG_PROMPT: &str = "Count from one to one hundred:";
const STORY_PROMPT: &str = "Here is a long story about the number 7. Once upon a time,";

#[test]
fn llama_greedy_text_through_cnse_equals_llama_servers_answer() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _llama)) = llama() else { return };
    let server = gateway(&[&url]);
    let mut c = server.client();
    for (k, (prompt, n)) in [
        ("The capital of France is", 24),
        ("def fibonacci(n):", 32),
        ("Olá! Je m'appelle", 16),
    ]
    .into_iter()
    .enumerate()
    {
        let g = c
            .generate(k as u64 + 1, 0, &greedy(n), prompt, |_, _| {})
            .unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
        let want = direct_answer(&url, prompt, n);
        assert!(!want.is_empty());
        assert_eq!(String::from_utf8(g.text).unwrap(), want, "prompt {prompt:?}");
        assert_eq!(g.end_tokens, g.tokens);
        assert!(g.tokens >= 1 && g.tokens <= u64::from(n));
        if g.tokens == u64::from(n) {
            assert_eq!(g.reason, common::FinishReason::Length);
        }
        assert!(g.server_ttft_us > 0 && g.server_ttft_us <= g.server_total_us);
    }
    // With a small credit window (backend paused and resumed on the way).
    let g = c
        .generate(9, 2, &greedy(32), "The capital of France is", |_, n| assert!(n <= 2))
        .unwrap();
    assert_eq!(
        String::from_utf8(g.text).unwrap(),
        direct_answer(&url, "The capital of France is", 32)
    );
}

#[test]
fn llama_four_concurrent_streams_complete() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _llama)) = llama() else { return };
    let server = gateway(&[&url]);
    let mut c = server.client();
    let prompts = ["Once upon a time", "The ocean is", "My favourite food is", "In 1969,"];
    for (k, p) in prompts.iter().enumerate() {
        c.request(k as u64 + 1, 0, &greedy(32), p).unwrap();
    }
    c.set_timeout(Duration::from_secs(60)).unwrap();
    let mut text = vec![Vec::new(); 4];
    let mut ended = [false; 4];
    while !ended.iter().all(|&e| e) {
        let f = c.next_frame().unwrap();
        let k = (f.stream_id - 1) as usize;
        match f.kind {
            Kind::Tokens => text[k].extend_from_slice(&f.payload),
            Kind::End => ended[k] = true,
            other => panic!("stream {}: {other:?} {}", f.stream_id, f.text()),
        }
    }
    for (k, p) in prompts.iter().enumerate() {
        assert_eq!(
            String::from_utf8(text[k].clone()).unwrap(),
            direct_answer(&url, p, 32),
            "{p}"
        );
    }
}

#[test]
fn llama_cancel_and_disconnect_free_the_llama_slot() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _llama)) = llama() else { return };
    let server = gateway(&[&url]);
    let mut c = server.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    // CANCEL: END with reason 2, and llama-server stops generating.
    c.request(1, 0, &greedy(400), LONG_PROMPT).unwrap();
    let mut tokens = 0;
    while tokens < 5 {
        let f = c.next_frame().unwrap();
        assert_eq!(f.kind, Kind::Tokens, "{}", f.text());
        tokens += f.arg;
    }
    assert_eq!(busy_slots(&url), 1);
    c.cancel(1).unwrap();
    let frames = read_stream(&mut c, 1);
    let end = frames.last().unwrap();
    assert_eq!((end.kind, end.arg), (Kind::End, 2), "{frames:?}");
    assert!(token_count(&frames) + u64::from(tokens) < 400);
    assert!(
        common::eventually(Duration::from_secs(3), || busy_slots(&url) == 0),
        "llama-server still generating 3 s after CANCEL"
    );
    // A closed client connection does the same.
    c.request(2, 0, &greedy(400), LONG_PROMPT).unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!(f.kind, Kind::Tokens);
    drop(c);
    assert!(
        common::eventually(Duration::from_secs(3), || busy_slots(&url) == 0),
        "llama-server still generating 3 s after the client left"
    );
    // And the gateway goes on serving.
    let g = server.client().generate(1, 0, &greedy(8), "Hello", |_, _| {}).unwrap();
    assert!(g.tokens >= 1);
}

#[test]
fn llama_killed_mid_stream_is_502_and_the_gateway_keeps_serving() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(doomed) = RealServer::start() else { return };
    let Some(other) = RealServer::start() else { return };
    // Failover would continue the stream on `other` (tests/llama_failover.rs).
    let urls = [doomed.url.as_str(), other.url.as_str()].join(",");
    let server = Server::start(&[
        "--backend",
        "llama",
        "--llama-url",
        &urls,
        "--threads",
        "2",
        "--llama-failover",
        "off",
    ]);
    let mut c = server.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    // Least-outstanding routing puts one stream on each llama-server.
    c.request(1, 0, &greedy(400), LONG_PROMPT).unwrap();
    c.request(2, 0, &greedy(400), LONG_PROMPT).unwrap();
    let mut seen = [0u32; 2];
    while seen.iter().any(|&n| n < 3) {
        let f = c.next_frame().unwrap();
        assert_eq!(f.kind, Kind::Tokens, "{}", f.text());
        seen[(f.stream_id - 1) as usize] += f.arg;
    }
    assert_eq!((busy_slots(&doomed.url), busy_slots(&other.url)), (1, 1));
    doomed.kill();
    let t0 = Instant::now();
    let mut errors = Vec::new();
    let mut ends = Vec::new();
    while errors.len() + ends.len() < 2 {
        let f = c.next_frame().unwrap();
        match f.kind {
            Kind::Tokens => {}
            Kind::Error => {
                errors.push((f.stream_id, f.arg, f.text(), t0.elapsed()));
                // The survivor is still streaming when the other failed.
                assert!(ends.is_empty());
            }
            Kind::End => ends.push(f.stream_id),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    let (_, code, msg, after) = &errors[0];
    assert_eq!(*code, 502, "{msg}");
    assert!(msg.contains(&doomed.url), "{msg}");
    assert!(*after < Duration::from_secs(2), "{after:?}");
    assert_eq!(ends.len(), 1);
    // New work goes to the survivor.
    let g = c
        .generate(3, 0, &greedy(16), "The capital of France is", |_, _| {})
        .unwrap();
    assert_eq!(
        String::from_utf8(g.text).unwrap(),
        direct_answer(&other.url, "The capital of France is", 16)
    );
}

// ---- without a real llama-server: the stand-in (same wire format, fixed
// pace) and dead ports ----

fn standin(ttft_ms: u64, interval_ms: u64) -> cnse_llama::standin::Standin {
    cnse_llama::standin::Standin::start(cnse_llama::standin::StandinConfig {
        ttft: Duration::from_millis(ttft_ms),
        token_interval: Duration::from_millis(interval_ms),
        close_after_stream: false,
    })
    .unwrap()
}

#[test]
fn llama_full_backends_queue_then_429() {
    let s = standin(5, 20);
    let server = Server::start(&[
        "--backend",
        "llama",
        "--llama-url",
        &s.url(),
        "--llama-inflight",
        "1",
        "--admission-queue-max",
        "1",
    ]);
    let mut c = server.client();
    c.request(1, 0, &greedy(20), "a").unwrap();
    // Let stream 1 take the only place before the next ones arrive.
    let f = c.next_frame().unwrap();
    assert_eq!((f.stream_id, f.kind), (1, Kind::Tokens));
    c.request(2, 0, &greedy(5), "b").unwrap();
    c.request(3, 0, &greedy(5), "c").unwrap();
    let mut done = std::collections::BTreeMap::new();
    while done.len() < 3 {
        let f = c.next_frame().unwrap();
        if matches!(f.kind, Kind::End | Kind::Error) {
            done.insert(f.stream_id, (f.kind, f.arg));
        }
    }
    assert_eq!(done[&1], (Kind::End, 0), "the running stream finishes");
    assert_eq!(done[&2], (Kind::End, 0), "the queued one runs after it");
    assert_eq!(done[&3], (Kind::Error, 429), "the queue is full");
}

#[test]
fn llama_unreachable_backend_is_502_and_the_server_lives() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let mut server = Server::start(&["--backend", "llama", "--llama-url", &dead]);
    let mut c = server.client();
    let t0 = Instant::now();
    for id in 1..=3 {
        c.request(id, 0, &greedy(8), "x").unwrap();
        let frames = read_stream(&mut c, id);
        let e = frames.last().unwrap();
        assert_eq!((e.kind, e.arg), (Kind::Error, 502), "{}", e.text());
        assert!(e.text().contains("llama-server"), "{}", e.text());
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(server.alive());
}

#[test]
fn llama_bad_url_is_one_line_and_nonzero_exit() {
    for url in [
        "https://127.0.0.1:1",
        "http://127.0.0.1",
        "http://127.0.0.1:1/completion",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                "llama",
                "--llama-url",
                url,
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{url}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("llama-server URL"), "{err}");
    }
}

#[test]
fn issue9_a_stalled_llama_stream_ends_with_504_and_frees_the_llama_slot() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((url, _llama)) = llama() else { return };
    let urls = [url.as_str()].join(",");
    let server = Server::start(&[
        "--backend",
        "llama",
        "--llama-url",
        &urls,
        "--threads",
        "2",
        "--stream-stall-timeout-ms",
        "200",
    ]);
    let mut c = server.client();
    c.set_timeout(Duration::from_secs(60)).unwrap();
    // One token of credit, never more, on a long generation (a story runs
    // to max_tokens; "count to one hundred" ends after 30 tokens with
    // SmolLM2, finished before the stall timeout on a fast machine).
    c.request(1, 1, &greedy(480), STORY_PROMPT).unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!((f.kind, f.arg), (Kind::Tokens, 1), "{}", f.text());
    let f = c.next_frame().unwrap();
    assert_eq!(
        (f.kind, f.arg),
        (Kind::Error, cnse_proto::code::BACKEND_TIMEOUT),
        "{}",
        f.text()
    );
    // The stream's HTTP exchange is closed: llama-server frees the slot at
    // once (its generation of 480 tokens would take seconds more here).
    let ended = Instant::now();
    assert!(
        common::eventually(Duration::from_secs(3), || busy_slots(&url) == 0),
        "llama-server still generating 3 s after the stalled stream ended"
    );
    eprintln!("slot free {:?} after the 504", ended.elapsed());
    let g = c.generate(2, 0, &greedy(8), "Hello", |_, _| {}).unwrap();
    assert!(g.tokens >= 1);
}
