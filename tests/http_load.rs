//! Issue 12: the load generator's HTTP mode (`bench --mode http`) against
//! servers that end keep-alive connections the ways real ones do:
//! `Connection: close` after some responses (nginx, `keepalive_requests`),
//! a silent close after every streamed answer (llama-server), and a close
//! inside a response (a failure). Also how it counts tokens that a server
//! packs into one event and reports in `usage`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cnse_client::load::{self, LoadConfig, LoadReport, Mode};

/// How the test server ends its connections.
#[derive(Clone, Copy)]
enum Ending {
    /// `Connection: close` on every `n`-th response of a connection, then
    /// a close.
    CloseHeaderEvery(u32),
    /// A close after every response, without a word (llama-server).
    SilentCloseAfterEach,
    /// The second response of each connection stops halfway.
    CloseInsideSecond,
    /// Keep-alive, the event stream cut into 7-byte chunks (lines span
    /// chunks, as when nginx passes a stream on).
    SmallChunks,
}

/// A streaming `/v1/completions` server: each answer is `max_tokens`
/// tokens in one event with `usage.completion_tokens`, then `[DONE]`.
struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
}

fn serve(ending: Ending) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            counter.fetch_add(1, Ordering::Relaxed);
            std::thread::spawn(move || answer(conn, ending));
        }
    });
    TestServer { addr, accepted }
}

fn answer(mut conn: TcpStream, ending: Ending) {
    let mut buf = Vec::new();
    let mut n = 0u32;
    while let Some(body) = read_request(&mut conn, &mut buf) {
        n += 1;
        let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let tokens = req["max_tokens"].as_u64().unwrap();
        let close = match ending {
            Ending::CloseHeaderEvery(k) => n.is_multiple_of(k),
            Ending::SilentCloseAfterEach | Ending::CloseInsideSecond | Ending::SmallChunks => false,
        };
        let text: String = (0..tokens).map(|k| format!(" t{k}")).collect();
        let events = [
            format!("data: {{\"choices\":[{{\"text\":\"{text}\",\"index\":0,\"finish_reason\":\"length\"}}],\"usage\":{{\"prompt_tokens\":3,\"completion_tokens\":{tokens}}}}}\n\n"),
            "data: [DONE]\n\n".to_string(),
        ];
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        let body = events.concat();
        let cut = if matches!(ending, Ending::SmallChunks) {
            7
        } else {
            body.len()
        };
        for piece in body.as_bytes().chunks(cut) {
            out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            out.extend_from_slice(piece);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        if matches!(ending, Ending::CloseInsideSecond) && n == 2 {
            let _ = conn.write_all(&out[..out.len() / 2]);
            return;
        }
        if conn.write_all(&out).is_err() || close || matches!(ending, Ending::SilentCloseAfterEach) {
            return;
        }
    }
}

/// One request's body (Content-Length framed), or `None` at the end.
fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut tmp = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let body = buf[end + 4..end + 4 + len].to_vec();
                buf.drain(..end + 4 + len);
                return Some(body);
            }
        }
        let n = conn.read(&mut tmp).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn run(addr: SocketAddr, connections: usize, inflight: usize, requests: u64) -> LoadReport {
    let mut cfg = LoadConfig::new(
        addr,
        Mode::Http {
            max_tokens: 5,
            temperature: 0.0,
            prompt: "hello there".to_string(),
            include_usage: true,
        },
    );
    cfg.connections = connections;
    cfg.inflight = inflight;
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_secs(10);
    cfg.requests = Some(requests);
    load::run(&cfg).unwrap()
}

#[test]
fn issue12_http_load_reopens_connections_the_server_closes_with_a_header() {
    let s = serve(Ending::CloseHeaderEvery(3));
    let r = run(s.addr, 2, 4, 200);
    assert_eq!(r.problems(), None, "{r:?}");
    assert_eq!(r.requests, 200);
    assert_eq!(r.tokens, 200 * 5, "usage counts the tokens packed into one event");
    assert_eq!(r.ttft.count(), 200);
    assert!(r.reconnects >= 200 / 3 - 2, "{} reconnects", r.reconnects);
    assert_eq!(
        s.accepted.load(Ordering::Relaxed),
        2 + r.reconnects,
        "every reopen is a new connection"
    );
    // Requests pipelined behind a `Connection: close` answer went out again.
    assert!(r.resent > 0, "pipelined requests behind the close");
}

#[test]
fn issue12_http_load_reopens_after_a_silent_close_like_llama_server() {
    let s = serve(Ending::SilentCloseAfterEach);
    let r = run(s.addr, 3, 1, 150);
    assert_eq!(r.problems(), None, "{r:?}");
    assert_eq!(r.requests, 150);
    assert_eq!(r.tokens, 150 * 5);
    assert!(r.reconnects >= 140, "{} reconnects", r.reconnects);
}

#[test]
fn issue12_http_load_reads_events_that_span_chunks() {
    let s = serve(Ending::SmallChunks);
    let r = run(s.addr, 2, 2, 100);
    assert_eq!(r.problems(), None, "{r:?}");
    assert_eq!((r.requests, r.tokens, r.reconnects), (100, 500, 0));
    // Each answer is one event with 5 tokens: 4 arrived with the first,
    // counted as coalesced, and no 0 µs gap is recorded for them.
    assert_eq!(r.tokens_coalesced, 100 * 4, "{r:?}");
    assert_eq!(r.inter_token.count(), 0, "tokens packed into one event have no gaps");
}

#[test]
fn issue12_http_load_loses_a_connection_closed_inside_a_response() {
    let s = serve(Ending::CloseInsideSecond);
    let mut cfg = LoadConfig::new(
        s.addr,
        Mode::Http {
            max_tokens: 5,
            temperature: 0.0,
            prompt: "x".to_string(),
            include_usage: false,
        },
    );
    cfg.connections = 1;
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_millis(500);
    cfg.drain_timeout = Duration::from_millis(200);
    let r = load::run(&cfg).unwrap();
    assert_eq!(r.connections_lost, 1, "{r:?}");
    assert_eq!(r.reconnects, 0);
    assert_eq!(r.requests, 1, "the first answer was whole");
}
