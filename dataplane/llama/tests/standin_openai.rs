//! The stand-in's OpenAI-compatible `/v1/completions` (what the Python
//! SDK's benchmark points the `openai` package at): streamed chunks, one
//! token each, a last chunk with `finish_reason`, then `[DONE]`; and the
//! non-streamed answer.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use cnse_llama::standin::{Standin, StandinConfig};

fn post(url: &str, body: &str) -> String {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Keep-alive: read until the end of this one answer.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "closed before the answer ended: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        let streamed_end = text.contains("[DONE]") && text.ends_with("\r\n0\r\n\r\n");
        if streamed_end || (text.contains("Content-Length") && text.ends_with('}')) {
            return text.into_owned();
        }
    }
}

#[test]
fn standin_streams_openai_completion_chunks_then_done() {
    let s = Standin::start(StandinConfig {
        ttft: Duration::from_millis(1),
        token_interval: Duration::from_millis(1),
        close_after_stream: false,
    })
    .unwrap();
    let answer = post(&s.url(), r#"{"model":"m","prompt":"hi","max_tokens":3,"stream":true}"#);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/event-stream"), "{answer}");
    let events: Vec<serde_json::Value> = answer
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 4, "{answer}");
    let texts: Vec<&str> = events
        .iter()
        .map(|e| e["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, [" tok0", " tok1", " tok2", ""]);
    assert!(events[..3].iter().all(|e| e["choices"][0]["finish_reason"].is_null()));
    assert_eq!(events[3]["choices"][0]["finish_reason"], "length");
    assert!(events.iter().all(|e| e["object"] == "text_completion"));
    assert!(answer.contains("data: [DONE]\n\n"), "{answer}");

    let whole = post(&s.url(), r#"{"model":"m","prompt":"hi","max_tokens":2}"#);
    let body: serde_json::Value = serde_json::from_str(whole.split_once("\r\n\r\n").unwrap().1).unwrap();
    assert_eq!(body["choices"][0]["text"], " tok0 tok1");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
}
