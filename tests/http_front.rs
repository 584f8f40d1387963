//! Issue 12: the OpenAI-compatible HTTP front (`serve --http-listen`),
//! driven over raw sockets as an independent client would: responses,
//! streams, pipelining, chunked bodies, errors, auth, timeouts,
//! backpressure and disconnects. The `openai` package's own run is
//! scripts/test-http.sh.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;

fn http_server(extra: &[&str]) -> (Server, SocketAddr) {
    let mut args = vec!["--http-listen", "127.0.0.1:0"];
    args.extend(extra);
    let s = Server::start(&args);
    let mut addr = None;
    assert!(
        eventually(WAIT, || {
            addr = s
                .output()
                .iter()
                .find_map(|l| l.strip_prefix("http listening on "))
                .and_then(|a| a.parse().ok());
            addr.is_some()
        }),
        "no `http listening on` line: {:?}",
        s.output()
    );
    (s, addr.unwrap())
}

/// One HTTP response: status, headers (lower-cased names), body (chunked
/// transfer coding removed).
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
    /// The `data:` payloads of an event stream, in order.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
            .collect()
    }
}

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        Conn { s, buf: Vec::new() }
    }

    fn send(&mut self, raw: &[u8]) {
        self.s.write_all(raw).unwrap();
    }

    fn post(&mut self, path: &str, body: &str) {
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        self.send(req.as_bytes());
    }

    fn get(&mut self, path: &str) {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }

    fn fill(&mut self) -> bool {
        let mut b = [0u8; 65536];
        match self.s.read(&mut b) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&b[..n]);
                true
            }
            Err(e) => panic!("reading a response: {e}"),
        }
    }

    fn line(&mut self) -> String {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8(self.buf[..p].to_vec()).unwrap();
                self.buf.drain(..p + 2);
                return l;
            }
            assert!(self.fill(), "connection closed mid-response");
        }
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.fill(), "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    fn response(&mut self) -> Response {
        let status_line = self.line();
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let l = self.line();
            if l.is_empty() {
                break;
            }
            let (n, v) = l.split_once(':').unwrap();
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        let mut r = Response {
            status,
            headers,
            body: Vec::new(),
        };
        if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().unwrap();
            r.body = self.take(n);
        } else if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line(), 16).unwrap();
                if size == 0 {
                    assert_eq!(self.line(), "");
                    break;
                }
                let chunk = self.take(size);
                r.body.extend_from_slice(&chunk);
                assert_eq!(self.take(2), b"\r\n");
            }
        }
        r
    }

    /// The peer closed (reads EOF) within the wait.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1024];
        matches!(self.s.read(&mut b), Ok(0)) || matches!(self.s.read(&mut b), Ok(0))
    }
}

fn synthetic_fast() -> Vec<String> {
    synthetic(0, 0)
}

#[test]
fn issue12_endpoints_answer_and_streams_equal_whole_responses() {
    let (_s, addr) = http_server(&strs(&synthetic_fast()));
    let mut c = Conn::new(addr);
    c.get("/health");
    let r = c.response();
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    c.get("/v1/models");
    let r = c.response();
    assert_eq!(r.json()["data"][0]["id"], "cnse-synthetic");
    for (path, body) in [
        (
            "/v1/completions",
            r#"{"prompt":"Hello there","max_tokens":7,"temperature":0,"seed":5"#,
        ),
        (
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"Hello"}],"max_tokens":7,"temperature":0,"seed":5"#,
        ),
    ] {
        c.post(path, &format!("{body}}}"));
        let whole = c.response();
        assert_eq!(whole.status, 200, "{}", String::from_utf8_lossy(&whole.body));
        let j = whole.json();
        let text = j["choices"][0]["text"]
            .as_str()
            .or(j["choices"][0]["message"]["content"].as_str())
            .unwrap()
            .to_string();
        assert_eq!(j["choices"][0]["finish_reason"], "length");
        assert_eq!(j["usage"]["completion_tokens"], 7);
        c.post(
            path,
            &format!(r#"{body},"stream":true,"stream_options":{{"include_usage":true}}}}"#),
        );
        let streamed = c.response();
        assert_eq!(streamed.header("content-type"), Some("text/event-stream"));
        let events = streamed.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
        let mut got = String::new();
        let mut usage = None;
        for e in &events[..events.len() - 1] {
            let v: serde_json::Value = serde_json::from_str(e).unwrap();
            if let Some(u) = v.get("usage") {
                usage = Some(u["completion_tokens"].as_u64().unwrap());
                continue;
            }
            let ch = &v["choices"][0];
            got.push_str(ch["text"].as_str().or(ch["delta"]["content"].as_str()).unwrap_or(""));
        }
        assert_eq!(got, text, "the stream's text equals the whole response's");
        assert_eq!(usage, Some(7));
    }
}

#[test]
fn issue12_pipelined_requests_are_answered_in_order_and_chunked_bodies_work() {
    let (_s, addr) = http_server(&strs(&synthetic_fast()));
    let mut c = Conn::new(addr);
    let body = r#"{"prompt":"a","max_tokens":2,"stream":true}"#;
    let (a, b) = body.split_at(9);
    let req = format!(
        "POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\nGET /health HTTP/1.1\r\n\r\n",
        a.len(),
        b.len()
    );
    c.send(req.as_bytes());
    let last = r#"{"prompt":"b","max_tokens":1}"#;
    c.send(
        format!(
            "POST /v1/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{last}",
            last.len()
        )
        .as_bytes(),
    );
    let first = c.response();
    assert_eq!(first.events().last().map(String::as_str), Some("[DONE]"));
    assert_eq!(c.response().json()["status"], "ok");
    assert_eq!(c.response().json()["usage"]["completion_tokens"], 1);
}

#[test]
fn issue12_pipelined_generations_run_together_but_answer_in_order() {
    // A paced backend: the first request is still streaming when the
    // others arrive; every response still comes back whole and in order,
    // the 404 after the streams before it.
    let (_s, addr) = http_server(&strs(&synthetic(0, 2000)));
    let mut c = Conn::new(addr);
    let mut raw = Vec::new();
    for (i, tokens) in [(0, 40), (1, 5), (2, 1)] {
        let body = format!(
            r#"{{"prompt":"p{i}","max_tokens":{tokens},"stream":true,"stream_options":{{"include_usage":true}}}}"#
        );
        raw.extend_from_slice(
            format!(
                "POST /v1/completions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    raw.extend_from_slice(b"GET /nope HTTP/1.1\r\n\r\n");
    raw.extend_from_slice(
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 29\r\n\r\n{\"prompt\":\"z\",\"max_tokens\":3}",
    );
    c.send(&raw);
    for tokens in [40, 5, 1] {
        let r = c.response();
        assert_eq!(r.status, 200);
        let events = r.events();
        let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        assert_eq!(usage["usage"]["completion_tokens"], tokens);
    }
    assert_eq!(c.response().status, 404);
    assert_eq!(c.response().json()["usage"]["completion_tokens"], 3);
}

#[test]
fn issue12_bad_requests_get_their_status_and_other_clients_go_on() {
    let (s, addr) = http_server(&strs(&synthetic(1000, 1000)));
    // A client streaming the whole time.
    let mut steady = Conn::new(addr);
    steady.post(
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":200,"stream":true,"stream_options":{"include_usage":true}}"#,
    );
    // Errors that keep the connection: the body was read whole.
    let mut c = Conn::new(addr);
    for (send, status) in [
        (&b"GET /nope HTTP/1.1\r\n\r\n"[..], 404),
        (b"GET /v1/completions HTTP/1.1\r\n\r\n", 405),
        (
            b"POST /v1/completions HTTP/1.1\r\nContent-Length: 8\r\n\r\nnot json",
            400,
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"prompt\":\"x\",\"max_tokens\":99999}",
            400,
        ),
    ] {
        c.send(send);
        let r = c.response();
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.json()["error"]["message"].is_string());
    }
    c.get("/health");
    assert_eq!(c.response().status, 200, "still serving after the errors");
    // Errors that end the connection: what follows cannot be framed.
    for (send, status) in [
        (b"GARBAGE\x01\r\n\r\n".to_vec(), 400),
        (
            [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; 20_000], b"\r\n\r\n"].concat(),
            431,
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n".to_vec(),
            413,
        ),
        (
            b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec(),
            400,
        ),
    ] {
        let mut bad = Conn::new(addr);
        bad.send(&send);
        let r = bad.response();
        assert_eq!(r.status, status);
        assert_eq!(r.header("connection"), Some("close"));
        assert!(bad.closed(), "closed after {status}");
    }
    let r = steady.response();
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 200, "every token arrived");
    drop(s);
}

#[test]
fn issue12_bearer_key_is_required_except_for_health() {
    let key = std::env::temp_dir().join(format!("cnse-http-key-{}", std::process::id()));
    std::fs::write(&key, "s3cret\n").unwrap();
    // Only the owner may read a key file (issue 11).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_s, addr) = http_server(&["--auth-key-file", key.to_str().unwrap()]);
    let mut c = Conn::new(addr);
    c.get("/health");
    assert_eq!(c.response().status, 200);
    for auth in ["", "Authorization: Bearer wrong\r\n", "Authorization: Basic s3cret\r\n"] {
        c.send(format!("GET /v1/models HTTP/1.1\r\n{auth}\r\n").as_bytes());
        assert_eq!(c.response().status, 401, "{auth:?}");
    }
    c.send(b"GET /v1/models HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n");
    assert_eq!(c.response().status, 200);
    std::fs::remove_file(&key).unwrap();
}

#[test]
fn issue12_a_slow_body_times_out_with_408() {
    let (_s, addr) = http_server(&["--handshake-timeout-ms", "300"]);
    let mut c = Conn::new(addr);
    c.send(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{\"pro");
    let r = c.response();
    assert_eq!(r.status, 408);
    assert!(c.closed());
}

#[test]
fn issue12_a_disconnect_frees_the_backend_and_a_slow_reader_pauses_it() {
    let mut args = synthetic(0, 2000);
    args.extend(["--stats-interval-ms".into(), "50".into()]);
    let (s, addr) = http_server(&strs(&args));
    let mut c = Conn::new(addr);
    c.post("/v1/completions", r#"{"prompt":"x","max_tokens":10000,"stream":true}"#);
    let head = c.line();
    assert!(head.contains("200"), "{head}");
    assert!(eventually(WAIT, || s.stat("active") == Some(1)), "{:?}", s.output());
    drop(c);
    assert!(
        eventually(WAIT, || s.stat("active") == Some(0)),
        "a disconnected client's work is freed: {:?}",
        s.output()
    );
    // Zero-delay tokens to a client that never reads: the stream pauses
    // (its queue bound) instead of buffering without end.
    // Enough tokens to fill the kernel's socket buffers many times over.
    let mut args = synthetic(0, 0);
    args.extend([
        "--stats-interval-ms".into(),
        "50".into(),
        "--max-tokens-limit".into(),
        "4000000".into(),
    ]);
    let (s, addr) = http_server(&strs(&args));
    let mut c = Conn::new(addr);
    c.post(
        "/v1/completions",
        r#"{"prompt":"x","max_tokens":4000000,"stream":true}"#,
    );
    assert!(eventually(WAIT, || s.stat("paused") == Some(1)), "{:?}", s.output());
    let produced = s.stat("produced").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        s.stat("produced").unwrap() - produced < 1000,
        "paused work keeps producing"
    );
    drop(c);
}

#[test]
fn issue12_metrics_are_prometheus_text() {
    let (_s, addr) = http_server(&strs(&synthetic_fast()));
    let mut c = Conn::new(addr);
    c.post("/v1/completions", r#"{"prompt":"x","max_tokens":3}"#);
    assert_eq!(c.response().status, 200);
    c.get("/nope");
    assert_eq!(c.response().status, 404);
    // The request metrics reach the shared snapshot within a sweep.
    std::thread::sleep(Duration::from_millis(250));
    c.get("/metrics");
    let r = c.response();
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    assert_eq!(value("cnse_requests_total{protocol=\"http\",outcome=\"ok\"}"), 1.0);
    assert!(value("cnse_tokens_sent_total") >= 3.0);
    assert_eq!(value("cnse_errors_total{code=\"404\"}"), 1.0);
    assert_eq!(value("cnse_ttft_seconds_count"), 1.0);
    assert_eq!(value("cnse_e2e_seconds_bucket{le=\"+Inf\"}"), 1.0);
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        assert_eq!(l.split(' ').count(), 2, "name value: {l}");
    }
}

#[test]
fn issue12_the_metrics_listener_serves_only_metrics_and_health() {
    let s = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let mut addr: Option<SocketAddr> = None;
    assert!(eventually(WAIT, || {
        addr = s
            .output()
            .iter()
            .find_map(|l| l.strip_prefix("metrics listening on "))
            .and_then(|a| a.parse().ok());
        addr.is_some()
    }));
    let mut c = Conn::new(addr.unwrap());
    c.get("/health");
    assert_eq!(c.response().status, 200);
    c.post("/v1/completions", r#"{"prompt":"x"}"#);
    assert_eq!(c.response().status, 404, "no API on the metrics listener");
    c.get("/metrics");
    let r = c.response();
    assert_eq!(r.status, 200);
    let text = String::from_utf8(r.body).unwrap();
    assert!(text.contains("cnse_backend_servers{state=\"up\"} 1\n"), "{text}");
    assert!(text.contains("cnse_backend_servers{state=\"down\"} 0\n"), "{text}");
}

#[test]
fn issue12_models_lists_the_store_names() {
    let dir = std::env::temp_dir().join(format!("cnse-http-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let file = dir.with_extension("bin");
    std::fs::write(&file, vec![7u8; 10_000]).unwrap();
    let put = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args([
            "store",
            "--store",
            dir.to_str().unwrap(),
            "put",
            file.to_str().unwrap(),
            "--name",
            "tiny:v1",
        ])
        .output()
        .unwrap();
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stderr));
    let (_s, addr) = http_server(&["--store", dir.to_str().unwrap()]);
    let mut c = Conn::new(addr);
    c.get("/v1/models");
    let v = c.response().json();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cnse-synthetic", "tiny:v1"]);
    assert_eq!(v["data"][1]["owned_by"], "cnse-dp store");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&file);
}

#[test]
fn issue12_usage_counts_prompt_tokens_as_the_backend_reads_them() {
    let prompt = "Hello, world. Bye";
    let usage_of = |addr: SocketAddr, stream: bool| {
        let mut c = Conn::new(addr);
        let body = format!(
            r#"{{"prompt":"{prompt}","max_tokens":2,"stream":{stream},"stream_options":{{"include_usage":true}}}}"#
        );
        c.post("/v1/completions", &body);
        let r = c.response();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        if !stream {
            return r.json()["usage"].clone();
        }
        let events = r.events();
        let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
        usage["usage"].clone()
    };
    // The synthetic model reads "Hello" "," " world" "." " Bye".
    let (_s, addr) = http_server(&strs(&synthetic_fast()));
    for stream in [false, true] {
        let u = usage_of(addr, stream);
        assert_eq!(
            (u["prompt_tokens"].as_u64(), u["completion_tokens"].as_u64()),
            (Some(5), Some(2))
        );
        assert_eq!(u["total_tokens"], 7);
    }
    // The llama backend reports llama-server's own count (the stand-in's
    // tokenizer is one token per byte), not the synthetic model's.
    let standin = cnse_llama::standin::Standin::start(cnse_llama::standin::StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
        close_after_stream: true,
    })
    .unwrap();
    let (_l, addr) = http_server(&["--backend", "llama", "--llama-url", &standin.url()]);
    for stream in [false, true] {
        let u = usage_of(addr, stream);
        assert_eq!(
            u["prompt_tokens"].as_u64(),
            Some(prompt.len() as u64),
            "stream {stream}: {u}"
        );
    }
}

#[test]
fn issue12_metrics_show_the_gateways_spares_and_events_within_the_process_cap() {
    let standin = cnse_llama::standin::Standin::start(cnse_llama::standin::StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
        close_after_stream: true,
    })
    .unwrap();
    let url = standin.url();
    let (_s, addr) = http_server(&[
        "--backend",
        "llama",
        "--llama-url",
        &url,
        "--threads",
        "4",
        "--llama-spare-conns",
        "1",
        "--llama-spares-max",
        "2",
    ]);
    let metrics = |name: &str| -> f64 {
        let mut c = Conn::new(addr);
        c.get("/metrics");
        let text = String::from_utf8(c.response().body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    // Four workers with one spare each; the process holds two.
    assert!(eventually(WAIT, || metrics("cnse_backend_spare_connections") == 2.0));
    // Connections land on the workers at random: some on the two that
    // hold a spare.
    for _ in 0..16 {
        let mut c = Conn::new(addr);
        c.post("/v1/completions", r#"{"prompt":"hi","max_tokens":3}"#);
        assert_eq!(c.response().status, 200);
    }
    let event = |e: &str| metrics(&format!("cnse_backend_events_total{{event=\"{e}\"}}"));
    // Request metrics reach the scrape within a sweep (100 ms).
    assert!(
        eventually(WAIT, || event("spares_taken") >= 1.0),
        "no request found a spare"
    );
    assert!(eventually(WAIT, || metrics("cnse_backend_spare_connections") == 2.0));
    let (opened, taken, closed) = (event("spares_opened"), event("spares_taken"), event("idle_closed"));
    // Every spare opened is held, was taken, or was closed by the server.
    assert!(
        opened <= 2.0 + taken + closed,
        "opened {opened}, taken {taken}, closed {closed}"
    );
    assert_eq!(event("evicted"), 0.0);
}
