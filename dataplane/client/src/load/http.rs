//! The load generator's HTTP mode: streaming OpenAI completions
//! (`POST /v1/completions`, `"stream": true`) over keep-alive HTTP/1.1
//! connections, `inflight` pipelined per connection. Responses come back
//! in order, so the slot a response belongs to is the oldest one issued.
//! Each response is parsed as it arrives: status line and headers, a
//! chunked or `Content-Length` body, and server-sent events inside it
//! (`data: ...` lines). The first event that carries text is the time to
//! first token; each later one an inter-token gap. Tokens are the events
//! with text, or the response's `usage.completion_tokens` when it has one
//! (cnse-dp packs the tokens of one loop turn into one event; llama-server
//! reports usage in its last chunk); tokens beyond the text events arrived
//! packed into them: they are counted as coalesced (`tokens_coalesced`),
//! not as 0 µs gaps, as the binary mode counts tokens packed into one frame.
//!
//! Servers end keep-alive connections: `Connection: close` on a response,
//! or a close after a complete response (llama-server closes after every
//! streamed answer, and after 100 requests in any case). The connection is
//! then opened again and the requests that got no answer byte are sent
//! again on it (counted as `reconnects` and `resent`); a close inside a
//! response, or twice in a row on a fresh connection before any answer,
//! loses the connection. Any server that speaks this (cnse-dp's front, the
//! axum peer in `benches/`, llama-server, nginx or HAProxy in front of one)
//! can be driven.

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
    /// A `Content-Length` body (an error answer): bytes left.
    Body(usize),
}

/// One connection's response parser.
#[derive(Debug)]
pub(super) struct HttpRx {
    rx: Rx,
    /// A head, chunk-size or trailer line being collected.
    line: Vec<u8>,
    /// An event-stream line being collected: it may span chunks (a proxy
    /// such as nginx cuts and joins the server's chunks as they arrive).
    event: Vec<u8>,
    status: u16,
    /// Head fields of the current response.
    chunked: bool,
    content_length: Option<usize>,
    close: bool,
    /// The current response's events with text so far, whether `[DONE]`
    /// came, and the token count its usage reported.
    text_events: u64,
    done: bool,
    usage_tokens: Option<u64>,
    /// A response said `Connection: close`: nothing more is sent on this
    /// connection; it is opened again once the server has closed it.
    closing: bool,
    /// Answer bytes received since the connection was (re)opened, and
    /// closes in a row that came before any.
    answered: bool,
    closes_unanswered: u8,
}

/// Longest line kept (a head line or an event): a peer that sends longer
/// ones is broken for this purpose.
const LINE_MAX: usize = 64 * 1024;
/// Closes in a row of a fresh connection before any answer byte after
/// which the connection counts as lost (a server that refuses to answer).
const CLOSES_UNANSWERED_MAX: u8 = 2;

/// What a close of the connection by the server means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Closed {
    /// Between responses: open it again and send what was not answered.
    Reopen,
    /// Inside a response, or a server that closes without answering.
    Lost,
}

impl HttpRx {
    pub(super) fn new() -> HttpRx {
        HttpRx {
            rx: Rx::Head,
            line: Vec::with_capacity(1024),
            event: Vec::with_capacity(1024),
            status: 0,
            chunked: false,
            content_length: None,
            close: false,
            text_events: 0,
            done: false,
            usage_tokens: None,
            closing: false,
            answered: false,
            closes_unanswered: 0,
        }
    }

    /// A response said `Connection: close`: send nothing more here.
    pub(super) fn closing(&self) -> bool {
        self.closing
    }

    /// The server closed the connection (EOF or an error on it).
    pub(super) fn on_close(&mut self) -> Closed {
        let between = self.rx == Rx::Head && self.status == 0 && self.line.is_empty() && self.event.is_empty();
        if !self.answered {
            self.closes_unanswered += 1;
        }
        if between && self.closes_unanswered < CLOSES_UNANSWERED_MAX {
            Closed::Reopen
        } else {
            Closed::Lost
        }
    }

    /// The connection was opened again: a fresh parser, keeping the count
    /// of unanswered closes.
    pub(super) fn reopened(&mut self) {
        let closes = self.closes_unanswered;
        *self = HttpRx::new();
        self.closes_unanswered = closes;
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
        if !input.is_empty() {
            self.answered = true;
            self.closes_unanswered = 0;
        }
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
                Rx::Body(left) => {
                    let take = left.min(input.len());
                    input = &input[take..];
                    if take == left {
                        self.end(st, c, now, ctx);
                    } else {
                        self.rx = Rx::Body(left - take);
                    }
                }
            }
        }
        Ok(())
    }

    fn push_line(&mut self, b: &[u8]) -> Result<(), ()> {
        push(&mut self.line, b)
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
                self.head_done(st, c, now, ctx);
                Ok(())
            }
            Rx::Head => self.header(&line),
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
            Rx::Data(_) | Rx::DataEnd(_) | Rx::Body(_) => unreachable!("bodies are not line-parsed here"),
        };
        self.line = line;
        self.line.clear();
        r
    }

    /// One header line: the fields that frame the body or end the
    /// connection.
    fn header(&mut self, line: &[u8]) -> Result<(), ()> {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Err(());
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.chunked = value.eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(value).ok().and_then(|s| s.parse().ok()).ok_or(())?;
            self.content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"connection") {
            self.close = value
                .split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        Ok(())
    }

    /// The blank line after the head: where the body goes.
    fn head_done(&mut self, st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) {
        if self.close {
            self.closing = true;
        }
        match (self.chunked, self.content_length) {
            (true, _) => self.rx = Rx::Size,
            (false, Some(0)) => self.end(st, c, now, ctx),
            (false, Some(n)) => self.rx = Rx::Body(n),
            // Neither: the body runs to the close, which `on_close` then
            // reports as inside a response.
            (false, None) => self.rx = Rx::Body(usize::MAX),
        }
    }

    /// Bytes of chunk data: event-stream lines.
    fn event_bytes(&mut self, mut b: &[u8], st: &mut Streams, now: u64, ctx: &mut Ctx) -> Result<(), ()> {
        while let Some(eol) = b.iter().position(|&x| x == b'\n') {
            push(&mut self.event, &b[..eol])?;
            b = &b[eol + 1..];
            let line = std::mem::take(&mut self.event);
            self.event_line(&line, st, now, ctx);
            self.event = line;
            self.event.clear();
        }
        push(&mut self.event, b)
    }

    fn event_line(&mut self, line: &[u8], st: &mut Streams, now: u64, ctx: &mut Ctx) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.strip_prefix(b" ").unwrap_or(data);
        if data == b"[DONE]" {
            self.done = true;
            return;
        }
        if let Some(n) = usage_tokens(data) {
            self.usage_tokens = Some(n);
        }
        let Some(&s) = st.order.front() else {
            return;
        };
        if has_text(data) {
            st.http_event(s as usize, self.text_events == 0, now, ctx);
            self.text_events += 1;
            if ctx.phase.in_window(now) {
                ctx.stats.tokens += 1;
            }
        } else if ctx.phase.in_window(now) {
            ctx.stats.frames_in += 1;
        }
    }

    /// The response ended: its slot finishes (ok when 200 with `[DONE]`).
    fn end(&mut self, st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) {
        let ok = self.status == 200 && self.done;
        if self.status != 200 {
            *ctx.stats.errors.entry(u32::from(self.status)).or_default() += 1;
        }
        // Tokens the usage counts beyond the events with text arrived
        // packed into those events.
        let packed = self.usage_tokens.map_or(0, |n| n.saturating_sub(self.text_events));
        if ok && packed > 0 {
            let in_window = ctx.phase.in_window(now);
            if let Some(&s) = st.order.front() {
                st.http_packed(s as usize, packed, in_window, ctx);
            }
            if in_window {
                ctx.stats.tokens += packed;
            }
        }
        if let Some(s) = st.order.pop_front() {
            finish_http(st, c, s as usize, now, ok, ctx);
        }
        self.rx = Rx::Head;
        self.status = 0;
        self.chunked = false;
        self.content_length = None;
        self.close = false;
        self.text_events = 0;
        self.done = false;
        self.usage_tokens = None;
        self.event.clear();
        if self.closing {
            // The server said it closes: our side goes now, so the recv in
            // flight completes and the connection is opened again without
            // waiting for the server's FIN.
            // SAFETY: shutdown on the fd of this connection, which it owns.
            unsafe { libc::shutdown(st.fd, libc::SHUT_RDWR) };
        }
    }
}

fn push(line: &mut Vec<u8>, b: &[u8]) -> Result<(), ()> {
    if line.len() + b.len() > LINE_MAX {
        return Err(());
    }
    line.extend_from_slice(b);
    Ok(())
}

/// Whether an event's JSON carries non-empty text: a completion's
/// `"text":"..."` or a chat delta's `"content":"..."`.
fn has_text(data: &[u8]) -> bool {
    [&b"\"text\":\""[..], b"\"content\":\""]
        .iter()
        .any(|key| find(data, key).is_some_and(|i| data.get(i + key.len()).is_some_and(|&b| b != b'"')))
}

/// `usage.completion_tokens` of an event, when it has one.
fn usage_tokens(data: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"completion_tokens\":";
    let rest = data[find(data, KEY)? + KEY.len()..].trim_ascii_start();
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// What one request asks.
pub(super) struct Body<'a> {
    pub(super) prompt: &'a str,
    pub(super) max_tokens: u32,
    pub(super) temperature: f32,
    pub(super) seed: u64,
    /// `stream_options.include_usage` (as vLLM's serving benchmark asks).
    pub(super) include_usage: bool,
}

/// Writes one streaming completion request (keep-alive).
pub(super) fn put_request(out: &mut Vec<u8>, b: &Body) {
    // The body goes first into the tail of `out`, then moves behind the
    // head once its length is known (no allocation).
    let start = out.len();
    let _ = write!(
        out,
        "{{\"model\":\"cnse\",\"prompt\":{},\"max_tokens\":{},\"temperature\":{},\"seed\":{},\"stream\":true{}}}",
        JsonStr(b.prompt),
        b.max_tokens,
        b.temperature,
        b.seed,
        if b.include_usage {
            ",\"stream_options\":{\"include_usage\":true}"
        } else {
            ""
        }
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
    fn events_with_text_and_usage_are_recognised() {
        let llama = br#"{"choices":[{"text":" sea","index":0,"finish_reason":null}],"object":"text_completion"}"#;
        let last = br#"{"choices":[{"text":"","index":0,"finish_reason":"length"}],"usage":{"completion_tokens":4,"prompt_tokens":8}}"#;
        let chat = br#"{"choices":[{"delta":{"content":"Hi"}}]}"#;
        let role = br#"{"choices":[{"delta":{"role":"assistant","content":null}}]}"#;
        assert_eq!(
            [has_text(llama), has_text(last), has_text(chat), has_text(role)],
            [true, false, true, false]
        );
        assert_eq!((usage_tokens(last), usage_tokens(llama)), (Some(4), None));
    }

    #[test]
    fn requests_are_well_formed() {
        let mut out = b"prev".to_vec();
        let body = Body {
            prompt: "a \"b\"\n",
            max_tokens: 8,
            temperature: 0.5,
            seed: 3,
            include_usage: true,
        };
        put_request(&mut out, &body);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text[4..].split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /v1/completions HTTP/1.1\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(
            (v["prompt"].as_str(), v["max_tokens"].as_u64(), v["stream"].as_bool()),
            (Some("a \"b\"\n"), Some(8), Some(true))
        );
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
