//! The load generator's HTTP mode: streaming OpenAI completions
//! (`POST /v1/completions`, `"stream": true`) over keep-alive HTTP/1.1
//! connections, `inflight` pipelined per connection. Responses come back
//! in order, so the slot a response belongs to is the oldest one issued.
//! Each response is parsed as it arrives: status line and headers, chunked
//! transfer coding, and server-sent events inside it (`data: ...` lines;
//! the first event with text is TTFT, `[DONE]` and the final chunk end it).
//! Any server that speaks this (cnse-dp's front, the axum peer in
//! `benches/`, a real llama-server) can be driven.

use std::io::Write as _;

use super::streams::{finish_http, Ctx, Streams};

/// Where the parser is in the current response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rx {
    /// Status line and headers, up to the blank line.
    Head,
    /// A chunk-size line.
    Size,
    /// Inside a chunk: bytes left.
    Data(usize),
    /// The CRLF after a chunk's data (bytes of it still to skip).
    DataEnd(u8),
    /// After the last chunk: trailers up to the blank line.
    Trailer,
}

/// One connection's response parser.
#[derive(Debug)]
pub(super) struct HttpRx {
    rx: Rx,
    /// A line being collected (head, size, trailer, or an event line).
    line: Vec<u8>,
    status: u16,
    /// The current response's events so far, and whether `[DONE]` came.
    events: u32,
    done: bool,
}

/// Longest line kept (a head line or an event): a peer that sends longer
/// ones is broken for this purpose.
const LINE_MAX: usize = 64 * 1024;

impl HttpRx {
    pub(super) fn new() -> HttpRx {
        HttpRx {
            rx: Rx::Head,
            line: Vec::with_capacity(1024),
            status: 0,
            events: 0,
            done: false,
        }
    }

    /// Feeds received bytes; `Err` when the connection cannot go on.
    pub(super) fn feed(
        &mut self,
        mut input: &[u8],
        st: &mut Streams,
        c: usize,
        now: u64,
        ctx: &mut Ctx,
    ) -> Result<(), ()> {
        while !input.is_empty() {
            match self.rx {
                Rx::Head | Rx::Size | Rx::Trailer => {
                    let Some(eol) = input.iter().position(|&b| b == b'\n') else {
                        self.push_line(input)?;
                        return Ok(());
                    };
                    self.push_line(&input[..eol])?;
                    input = &input[eol + 1..];
                    if self.line.last() == Some(&b'\r') {
                        self.line.pop();
                    }
                    self.line_done(st, c, now, ctx)?;
                }
                Rx::Data(left) => {
                    let take = left.min(input.len());
                    self.event_bytes(&input[..take], st, now, ctx)?;
                    input = &input[take..];
                    self.rx = if take == left {
                        Rx::DataEnd(2)
                    } else {
                        Rx::Data(left - take)
                    };
                }
                Rx::DataEnd(n) => {
                    let take = usize::from(n).min(input.len());
                    input = &input[take..];
                    self.rx = if take == usize::from(n) {
                        Rx::Size
                    } else {
                        Rx::DataEnd(n - take as u8)
                    };
                }
            }
        }
        Ok(())
    }

    fn push_line(&mut self, b: &[u8]) -> Result<(), ()> {
        if self.line.len() + b.len() > LINE_MAX {
            return Err(());
        }
        self.line.extend_from_slice(b);
        Ok(())
    }

    /// A complete line in a head, size or trailer position.
    fn line_done(&mut self, st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) -> Result<(), ()> {
        let line = std::mem::take(&mut self.line);
        let r = match self.rx {
            Rx::Head if self.status == 0 => {
                // "HTTP/1.1 200 OK"
                self.status = line
                    .split(|&b| b == b' ')
                    .nth(1)
                    .and_then(|s| std::str::from_utf8(s).ok())
                    .and_then(|s| s.parse().ok())
                    .ok_or(())?;
                Ok(())
            }
            Rx::Head if line.is_empty() => {
                // Only chunked event streams are expected.
                self.rx = Rx::Size;
                Ok(())
            }
            Rx::Head => Ok(()),
            Rx::Size => {
                let hex = line.split(|&b| b == b';').next().unwrap_or(&[]);
                let size = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                    .ok_or(())?;
                self.rx = if size == 0 { Rx::Trailer } else { Rx::Data(size) };
                Ok(())
            }
            Rx::Trailer if line.is_empty() => {
                self.end(st, c, now, ctx);
                Ok(())
            }
            Rx::Trailer => Ok(()),
            Rx::Data(_) | Rx::DataEnd(_) => unreachable!("data is not line-parsed here"),
        };
        self.line = line;
        self.line.clear();
        r
    }

    /// Bytes of chunk data: event-stream lines.
    fn event_bytes(&mut self, mut b: &[u8], st: &mut Streams, now: u64, ctx: &mut Ctx) -> Result<(), ()> {
        while let Some(eol) = b.iter().position(|&x| x == b'\n') {
            self.push_line(&b[..eol])?;
            b = &b[eol + 1..];
            if let Some(data) = self.line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                if data == b"[DONE]" {
                    self.done = true;
                } else if let Some(&s) = st.http_order.front() {
                    st.http_event(s as usize, self.events == 0, now, ctx);
                    self.events += 1;
                }
            }
            self.line.clear();
        }
        self.push_line(b)
    }

    /// The response ended: its slot finishes (ok when 200 with `[DONE]`).
    fn end(&mut self, st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) {
        let ok = self.status == 200 && self.done;
        if self.status != 200 {
            *ctx.stats.errors.entry(u32::from(self.status)).or_default() += 1;
        }
        if let Some(s) = st.http_order.pop_front() {
            finish_http(st, c, s as usize, now, ok, ctx);
        }
        self.rx = Rx::Head;
        self.status = 0;
        self.events = 0;
        self.done = false;
    }
}

/// Writes one streaming completion request (keep-alive).
pub(super) fn put_request(out: &mut Vec<u8>, prompt: &str, max_tokens: u32, temperature: f32, seed: u64) {
    // The body goes first into the tail of `out`, then moves behind the
    // head once its length is known (no allocation).
    let start = out.len();
    let _ = write!(
        out,
        "{{\"model\":\"cnse\",\"prompt\":{},\"max_tokens\":{max_tokens},\"temperature\":{temperature},\"seed\":{seed},\"stream\":true}}",
        JsonStr(prompt)
    );
    let body_len = out.len() - start;
    let mut head = [0u8; 160];
    let mut w = &mut head[..];
    let _ = write!(
        w,
        "POST /v1/completions HTTP/1.1\r\nHost: cnse\r\nContent-Type: application/json\r\nContent-Length: {body_len}\r\n\r\n"
    );
    let head_len = 160 - w.len();
    out.splice(start..start, head[..head_len].iter().copied());
}

/// A string written as a JSON literal.
struct JsonStr<'a>(&'a str);

impl std::fmt::Display for JsonStr<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("\"")?;
        for ch in self.0.chars() {
            match ch {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => write!(f, "{c}")?,
            }
        }
        f.write_str("\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_well_formed() {
        let mut out = b"prev".to_vec();
        put_request(&mut out, "a \"b\"\n", 8, 0.5, 3);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text[4..].split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/completions HTTP/1.1\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["prompt"].as_str(), v["max_tokens"].as_u64(), v["stream"].as_bool()),
            (Some("a \"b\"\n"), Some(8), Some(true))
        );
    }
}
