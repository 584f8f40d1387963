//! Helpers shared by the llama backend's tests: fake llama-servers that
//! misbehave on purpose, and a real llama-server started on demand.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnse_llama::{LlamaConfig, LlamaFactory};

/// How a fake llama-server answers `POST /completion`.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// A well-formed chunked SSE stream of `tokens` events (text "t0 t1 ..."),
    /// `delay` apart, then the final event; keep-alive.
    Tokens { tokens: usize, delay: Duration },
    /// Bytes that are not HTTP.
    Garbage,
    /// HTTP 500 with a llama-server style JSON error.
    Status500,
    /// HTTP 400 as llama-server answers a prompt longer than its context.
    Status400,
    /// `tokens` events, then the connection is dropped.
    CloseMidStream { tokens: usize },
    /// Reads the request and never answers.
    Hang,
    /// A complete answer, then the connection is closed although the head
    /// promised keep-alive (a server dropping an idle connection).
    TokensThenClose { tokens: usize },
    /// As `Tokens` (no delay), and a connection that waits longer than
    /// `idle` for its next request is closed (llama-server closes idle
    /// keep-alive connections after 5 s).
    IdleClose { tokens: usize, idle: Duration },
    /// As `Tokens` (no delay), except that the first completion request
    /// the server gets has its connection closed without an answer.
    DropFirst { tokens: usize, dropped: Arc<AtomicBool> },
    /// A model that continues its own text: the prompt's words `tK` count
    /// as tokens already generated, and the answer is the next
    /// `n_predict` of them (`t3 t4 ...`), then the final event (limit).
    Continue,
}

/// A fake llama-server on an ephemeral loopback port.
pub struct Fake {
    pub url: String,
    /// `/health` answers 200 while true, 503 otherwise.
    pub healthy: Arc<AtomicBool>,
    /// Completion requests received.
    pub requests: Arc<AtomicUsize>,
    /// Streams whose client went away before the last event.
    pub aborted: Arc<AtomicUsize>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// The body of every completion request received, in order.
    pub bodies: Arc<Mutex<Vec<String>>>,
}

impl Fake {
    pub fn start(behaviour: Behaviour) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let fake = Fake {
            url,
            healthy: Arc::new(AtomicBool::new(true)),
            requests: Arc::default(),
            aborted: Arc::default(),
            connections: Arc::default(),
            bodies: Arc::default(),
        };
        let (healthy, requests, aborted, connections, bodies) = (
            fake.healthy.clone(),
            fake.requests.clone(),
            fake.aborted.clone(),
            fake.connections.clone(),
            fake.bodies.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                connections.fetch_add(1, Ordering::SeqCst);
                let (b, h, r, a) = (behaviour.clone(), healthy.clone(), requests.clone(), aborted.clone());
                let bodies = bodies.clone();
                std::thread::spawn(move || serve(conn, b, h, r, a, bodies));
            }
        });
        fake
    }
}

/// Reads one request head and body; returns the request line and body.
fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, String)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut tmp = [0u8; 4096];
                let n = conn.read(&mut tmp).ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&tmp[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            buf.drain(..end + 4 + len);
            return Some((head.lines().next().unwrap_or("").to_string(), body));
        }
        let mut tmp = [0u8; 4096];
        let n = conn.read(&mut tmp).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn chunk(conn: &mut TcpStream, data: &str) -> std::io::Result<()> {
    conn.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
}

const SSE_HEAD: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n";

fn token_event(k: usize) -> String {
    format!("data: {{\"index\":0,\"content\":\"t{k} \",\"tokens\":[{k}],\"stop\":false}}\n\n")
}

fn serve(
    mut conn: TcpStream,
    behaviour: Behaviour,
    healthy: Arc<AtomicBool>,
    requests: Arc<AtomicUsize>,
    aborted: Arc<AtomicUsize>,
    bodies: Arc<Mutex<Vec<String>>>,
) {
    conn.set_nodelay(true).unwrap();
    if let Behaviour::IdleClose { idle, .. } = behaviour {
        conn.set_read_timeout(Some(idle)).unwrap();
    }
    let mut drop_first = None;
    let behaviour = match behaviour {
        Behaviour::IdleClose { tokens, .. } => Behaviour::Tokens {
            tokens,
            delay: Duration::ZERO,
        },
        Behaviour::DropFirst { tokens, dropped } => {
            drop_first = Some(dropped);
            Behaviour::Tokens {
                tokens,
                delay: Duration::ZERO,
            }
        }
        b => b,
    };
    let mut buf = Vec::new();
    while let Some((line, body)) = read_request(&mut conn, &mut buf) {
        if line.starts_with("GET /slots") {
            // As llama-server with -np 4 lists its slots.
            let body = r#"[{"id":0,"is_processing":false},{"id":1,"is_processing":false},{"id":2,"is_processing":false},{"id":3,"is_processing":false}]"#;
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            continue;
        }
        if line.starts_with("GET /health") {
            let (status, body) = if healthy.load(Ordering::SeqCst) {
                ("200 OK", "{\"status\":\"ok\"}")
            } else {
                (
                    "503 Service Unavailable",
                    "{\"error\":{\"code\":503,\"message\":\"Loading model\"}}",
                )
            };
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            continue;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        bodies.lock().unwrap().push(body.clone());
        if drop_first.as_ref().is_some_and(|d| !d.swap(true, Ordering::SeqCst)) {
            return;
        }
        match &behaviour {
            Behaviour::Tokens { tokens, delay } => {
                let ok = (|| -> std::io::Result<()> {
                    conn.write_all(SSE_HEAD.as_bytes())?;
                    for k in 0..*tokens {
                        chunk(&mut conn, &token_event(k))?;
                        if !delay.is_zero() {
                            std::thread::sleep(*delay);
                        }
                    }
                    chunk(
                        &mut conn,
                        &format!("data: {{\"content\":\"\",\"tokens\":[],\"stop\":true,\"stop_type\":\"limit\",\"tokens_predicted\":{tokens}}}\n\n"),
                    )?;
                    conn.write_all(b"0\r\n\r\n")
                })();
                if ok.is_err() {
                    aborted.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            Behaviour::TokensThenClose { tokens } => {
                let _ = conn.write_all(SSE_HEAD.as_bytes());
                for k in 0..*tokens {
                    let _ = chunk(&mut conn, &token_event(k));
                }
                let _ = chunk(
                    &mut conn,
                    "data: {\"content\":\"\",\"stop\":true,\"stop_type\":\"eos\"}\n\n",
                );
                let _ = conn.write_all(b"0\r\n\r\n");
                std::thread::sleep(Duration::from_millis(50));
                return;
            }
            Behaviour::Garbage => {
                let _ = conn.write_all(b"\x00\x01 this is not HTTP at all\r\n\r\n");
                return;
            }
            Behaviour::Status500 => {
                let body = "{\"error\":{\"code\":500,\"message\":\"boom\",\"type\":\"server_error\"}}";
                let _ = conn.write_all(
                    format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
            Behaviour::Status400 => {
                let body = "{\"error\":{\"code\":400,\"message\":\"request (1501 tokens) exceeds the available context size (512 tokens)\",\"type\":\"exceed_context_size_error\"}}";
                let _ = conn.write_all(
                    format!("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
                return;
            }
            Behaviour::CloseMidStream { tokens } => {
                let _ = conn.write_all(SSE_HEAD.as_bytes());
                for k in 0..*tokens {
                    let _ = chunk(&mut conn, &token_event(k));
                }
                std::thread::sleep(Duration::from_millis(20));
                return;
            }
            Behaviour::Hang => {
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
            Behaviour::Continue => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                let prompt = v["prompt"].as_str().unwrap_or("");
                let done = prompt
                    .split_whitespace()
                    .filter(|w| w.strip_prefix('t').is_some_and(|n| n.parse::<u32>().is_ok()))
                    .count();
                let n = v["n_predict"].as_u64().unwrap() as usize;
                let _ = conn.write_all(SSE_HEAD.as_bytes());
                for k in done..done + n {
                    let _ = chunk(&mut conn, &token_event(k));
                }
                let _ = chunk(
                    &mut conn,
                    &format!("data: {{\"content\":\"\",\"tokens\":[],\"stop\":true,\"stop_type\":\"limit\",\"tokens_predicted\":{n}}}\n\n"),
                );
                let _ = conn.write_all(b"0\r\n\r\n");
            }
            Behaviour::IdleClose { .. } | Behaviour::DropFirst { .. } => unreachable!("mapped to Tokens above"),
        }
    }
}

/// A config for tests: short timeouts so failures show quickly.
pub fn config(urls: &[&str]) -> LlamaConfig {
    LlamaConfig {
        urls: urls.iter().map(|u| u.to_string()).collect(),
        connect_timeout: Duration::from_millis(500),
        first_token_timeout: Duration::from_millis(800),
        idle_token_timeout: Duration::from_millis(800),
        health_interval: Duration::from_millis(100),
        health_timeout: Duration::from_millis(300),
        ..Default::default()
    }
}

pub fn backend(cfg: LlamaConfig) -> cnse_llama::LlamaBackend {
    LlamaFactory::new(cfg).unwrap().backend()
}

/// A TCP port nothing listens on.
pub fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    url
}

// The real llama-server helpers are shared with the root package's tests.
#[path = "../../../../tests/llama_common/mod.rs"]
mod real;
#[allow(unused_imports)]
pub use real::*;
