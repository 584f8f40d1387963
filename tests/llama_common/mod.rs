//! A real llama-server for the `tests/llama_*.rs` suites: `CNSE_LLAMA_URL`
//! when set, else one started by scripts/llama-server.sh on an ephemeral
//! port (stopped on drop); "skipped: ..." when it cannot be started, unless
//! `CNSE_REQUIRE_SERVICES=1`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The repository root: the first folder above the running test's crate
/// that holds scripts/llama-server.sh (this module is shared by the root
/// package's tests and cnse-llama's).
pub fn repo_root() -> PathBuf {
    let mut dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    while !dir.join("scripts/llama-server.sh").exists() {
        assert!(
            dir.pop(),
            "no scripts/llama-server.sh above {}",
            env!("CARGO_MANIFEST_DIR")
        );
    }
    dir
}

/// A real llama-server started by `scripts/llama-server.sh` on its own
/// port, stopped on drop.
pub struct RealServer {
    pub url: String,
    pub port: u16,
}

impl RealServer {
    /// `None` (after printing why) when it cannot be started and services
    /// are not required; panics when `CNSE_REQUIRE_SERVICES=1`.
    pub fn start() -> Option<RealServer> {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let out = Command::new(repo_root().join("scripts/llama-server.sh"))
            .args(["start", &port.to_string()])
            .output();
        match out {
            Ok(o) if o.status.success() => Some(RealServer {
                url: String::from_utf8_lossy(&o.stdout).trim().to_string(),
                port,
            }),
            Ok(o) => skip(&format!(
                "scripts/llama-server.sh start failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => skip(&format!("cannot run scripts/llama-server.sh: {e}")),
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) {
        let pidfile = state_dir().join(format!("{}.pid", self.port));
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let status = Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
        assert!(status.success());
    }
}

impl Drop for RealServer {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/llama-server.sh"))
            .args(["stop", &self.port.to_string()])
            .status();
    }
}

fn state_dir() -> PathBuf {
    let cache = std::env::var("CNSE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/cnse-dp"));
    cache.join("llama-server")
}

pub fn skip<T>(why: &str) -> Option<T> {
    if std::env::var("CNSE_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("llama-server required (CNSE_REQUIRE_SERVICES=1): {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// The llama-server to test against: `CNSE_LLAMA_URL`, else one started
/// here (kept in the returned guard).
pub fn llama() -> Option<(String, Option<RealServer>)> {
    if let Ok(url) = std::env::var("CNSE_LLAMA_URL") {
        return Some((url, None));
    }
    let s = RealServer::start()?;
    Some((s.url.clone(), Some(s)))
}

/// Plain blocking HTTP request; returns status and body (Connection: close).
pub fn http(url: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let addr = url.strip_prefix("http://").unwrap().trim_end_matches('/');
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let body = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// llama-server's own answer to a plain greedy request, as a user would
/// send it.
pub fn direct_answer(url: &str, prompt: &str, n: u32) -> String {
    let body = serde_json::json!({ "prompt": prompt, "n_predict": n, "temperature": 0.0 }).to_string();
    let (status, body) = http(url, "POST", "/completion", &body);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["content"].as_str().unwrap().to_string()
}

/// llama-server slots generating right now (its `/slots`).
pub fn busy_slots(url: &str) -> usize {
    let (status, body) = http(url, "GET", "/slots", "");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["is_processing"] == true)
        .count()
}

/// llama-server's `/metrics` prompt counters: (prompt tokens evaluated,
/// prompt tokens taken from the cache). The server whose counters moved
/// served the request.
pub fn prompt_counters(url: &str) -> (u64, u64) {
    let (status, body) = http(url, "GET", "/metrics", "");
    assert_eq!(status, 200, "{url}/metrics: {body}");
    let get = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{url}/metrics has no {name}"))
    };
    (
        get("llamacpp:prompt_tokens_total ") as u64,
        get("llamacpp:prompt_tokens_cached_total ") as u64,
    )
}
