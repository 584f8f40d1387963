//! A stand-in for llama-server: the same HTTP/SSE wire format as the real
//! one (recorded from llama.cpp b10434: chunked `text/event-stream`, one
//! `data:` event per token with its id, a last event with `stop`,
//! `stop_type`, `tokens_predicted`; `GET /health`), with a fixed, known
//! pace instead of a model. The gateway-overhead benchmark points both of
//! its sides at it to measure what cnse-dp adds without CPU inference
//! noise on top. It also serves llama-server's OpenAI-compatible
//! `POST /v1/completions` (streamed as OpenAI's SSE chunks ending in
//! `data: [DONE]`, or one JSON answer), with the same tokens at the same
//! pace, so the official `openai` package can stream from it (the Python
//! SDK's benchmark). One thread per connection; not a production server.
//!
//! Prompt tokens are the prompt's bytes (a byte-level tokenizer: the
//! stand-in has no model), reported where llama-server reports its own
//! counts: `tokens_evaluated` on each event and `timings.prompt_n` on the
//! last of `/completion`, `usage` on the last chunk of `/v1/completions`.
//! With `close_after_stream` it closes the connection after each streamed
//! answer, as llama-server does (b10434 ends every keep-alive connection
//! that carried a stream, despite its `Keep-Alive: max=100` header).
//! `GET /standin/requests` answers `{"requests":N}`, the generation
//! requests it took so far (tests tell which stand-in served a stream).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::LlamaError;

/// Pace of the stand-in.
#[derive(Debug, Clone, Copy)]
pub struct StandinConfig {
    /// From the end of the request to the first token.
    pub ttft: Duration,
    /// Between tokens.
    pub token_interval: Duration,
    /// Close the connection after each streamed answer (llama-server's
    /// behaviour) instead of keeping it for the next request.
    pub close_after_stream: bool,
}

/// Bytes of one request (head and body) at most.
const REQUEST_BYTES_MAX: usize = 1 << 20;

/// A running stand-in; stops accepting when dropped.
pub struct Standin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
}

impl Standin {
    pub fn start(cfg: StandinConfig) -> Result<Standin, LlamaError> {
        let io = |op, source| LlamaError::Io {
            op,
            url: "http://127.0.0.1:0".into(),
            source,
        };
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| io("bind", e))?;
        let addr = listener.local_addr().map_err(|e| io("local_addr", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let connections2 = connections.clone();
        let requests = Arc::new(AtomicU64::new(0));
        let requests2 = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                connections2.fetch_add(1, Ordering::AcqRel);
                let requests = requests2.clone();
                std::thread::spawn(move || serve(conn, cfg, &requests));
            }
        });
        Ok(Standin {
            addr,
            stop,
            connections,
            requests,
        })
    }

    /// Generation requests taken so far (`/completion`, `/v1/completions`).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Acquire)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(mut conn: TcpStream, cfg: StandinConfig, requests: &AtomicU64) {
    let _ = conn.set_nodelay(true);
    let mut buf = Vec::with_capacity(8192);
    let mut out = Vec::with_capacity(8192);
    loop {
        let Some((path, body)) = read_request(&mut conn, &mut buf) else {
            return;
        };
        if path == "/health" {
            let body = "{\"status\":\"ok\"}";
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if path == "/standin/requests" {
            let body = format!("{{\"requests\":{}}}", requests.load(Ordering::Acquire));
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            continue;
        }
        if path == "/completion" || path == "/v1/completions" {
            requests.fetch_add(1, Ordering::AcqRel);
        }
        if path == "/v1/completions" {
            match openai_completion(&mut conn, &body, cfg, &mut out) {
                Ok(streamed) if !(streamed && cfg.close_after_stream) => continue,
                _ => return,
            }
        }
        let req = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
        let n_predict = req["n_predict"].as_u64().unwrap_or(16).min(TOKENS_MAX);
        let prompt_n = prompt_tokens(&req);
        let t0 = Instant::now();
        let head = "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n\
                    Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n";
        if conn.write_all(head.as_bytes()).is_err() {
            return;
        }
        for k in 0..n_predict {
            // An absolute schedule: no drift from slow writes.
            if let Some(wait) = due(t0, cfg, k).checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let event = format!(
                "data: {{\"index\":0,\"content\":\" tok{k}\",\"tokens\":[{}],\"stop\":false,\"id_slot\":-1,\"tokens_predicted\":{},\"tokens_evaluated\":{prompt_n}}}\n\n",
                1000 + k,
                k + 1
            );
            out.clear();
            out.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
            out.extend_from_slice(event.as_bytes());
            out.extend_from_slice(b"\r\n");
            if conn.write_all(&out).is_err() {
                return;
            }
        }
        let last = format!(
            "data: {{\"content\":\"\",\"tokens\":[],\"stop\":true,\"stop_type\":\"limit\",\"stopping_word\":\"\",\"tokens_predicted\":{n_predict},\
             \"timings\":{{\"cache_n\":0,\"prompt_n\":{prompt_n},\"predicted_n\":{n_predict}}}}}\n\n"
        );
        let tail = format!("{:x}\r\n{last}\r\n0\r\n\r\n", last.len());
        if conn.write_all(tail.as_bytes()).is_err() || cfg.close_after_stream {
            return;
        }
    }
}

/// The stand-in's prompt tokens: the bytes of `prompt` (a string, or the
/// first of an array of strings).
fn prompt_tokens(req: &serde_json::Value) -> usize {
    let p = &req["prompt"];
    p.as_str().or_else(|| p[0].as_str()).map_or(0, str::len)
}

/// Tokens of one stand-in answer at most.
const TOKENS_MAX: u64 = 1 << 20;

/// When token `k` of an answer started at `t0` is due.
fn due(t0: Instant, cfg: StandinConfig, k: u64) -> Instant {
    t0 + cfg.ttft + cfg.token_interval * u32::try_from(k).unwrap_or(u32::MAX)
}

/// `POST /v1/completions` as llama-server's OpenAI-compatible API answers
/// it: `max_tokens` (default 16) tokens " tok0", " tok1", ...; with
/// `"stream": true` one `text_completion` chunk per token, a last chunk
/// with `finish_reason` "length" and `usage`, then `data: [DONE]`.
/// Returns whether the answer was streamed.
fn openai_completion(
    conn: &mut TcpStream,
    body: &[u8],
    cfg: StandinConfig,
    out: &mut Vec<u8>,
) -> std::io::Result<bool> {
    let req = serde_json::from_slice::<serde_json::Value>(body).unwrap_or_default();
    let n = req["max_tokens"].as_u64().unwrap_or(16).min(TOKENS_MAX);
    let stream = req["stream"].as_bool().unwrap_or(false);
    let prompt_n = prompt_tokens(&req);
    let t0 = Instant::now();
    let chunk = |text: &str, finish: &str| {
        let usage = if finish == "null" {
            String::new()
        } else {
            format!(
                ",\"usage\":{{\"completion_tokens\":{n},\"prompt_tokens\":{prompt_n},\"total_tokens\":{}}}",
                n + prompt_n as u64
            )
        };
        format!(
            "{{\"id\":\"cmpl-standin\",\"object\":\"text_completion\",\"created\":0,\"model\":\"standin\",\
             \"choices\":[{{\"text\":\"{text}\",\"index\":0,\"logprobs\":null,\"finish_reason\":{finish}}}]{usage}}}"
        )
    };
    if !stream {
        if let Some(wait) = due(t0, cfg, n.saturating_sub(1)).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let text: String = (0..n).map(|k| format!(" tok{k}")).collect();
        let body = chunk(&text, "\"length\"");
        let head = format!(
            "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes())?;
        return conn.write_all(body.as_bytes()).map(|()| false);
    }
    let head = "HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n\
                Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n";
    conn.write_all(head.as_bytes())?;
    let mut put_event = |data: &str, out: &mut Vec<u8>| {
        let event = format!("data: {data}\n\n");
        out.clear();
        out.extend_from_slice(format!("{:x}\r\n", event.len()).as_bytes());
        out.extend_from_slice(event.as_bytes());
        out.extend_from_slice(b"\r\n");
        conn.write_all(out)
    };
    for k in 0..n {
        if let Some(wait) = due(t0, cfg, k).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        put_event(&chunk(&format!(" tok{k}"), "null"), out)?;
    }
    put_event(&chunk("", "\"length\""), out)?;
    put_event("[DONE]", out)?;
    conn.write_all(b"0\r\n\r\n").map(|()| true)
}

/// Reads one request; returns its path and body.
fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    let mut tmp = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        let parsed = req.parse(buf).ok()?;
        if let httparse::Status::Complete(head_len) = parsed {
            let path = req.path.unwrap_or("/").to_string();
            let len = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if head_len + len > REQUEST_BYTES_MAX {
                return None;
            }
            while buf.len() < head_len + len {
                let n = conn.read(&mut tmp).ok().filter(|&n| n > 0)?;
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = buf[head_len..head_len + len].to_vec();
            buf.drain(..head_len + len);
            return Some((path, body));
        }
        if buf.len() > REQUEST_BYTES_MAX {
            return None;
        }
        let n = conn.read(&mut tmp).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&tmp[..n]);
    }
}
