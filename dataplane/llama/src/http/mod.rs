//! HTTP/1.1 response decoding, pure: bytes in, typed items out; no sockets.
//!
//! [`ResponseDecoder`] takes the response to one request in pieces of any
//! size (as `recv` hands them over) and yields the head, then the body as
//! lines (server-sent events are line-oriented), then the end. Chunked
//! transfer-encoding, `Content-Length` and read-until-close bodies are
//! handled; every buffer it keeps is bounded. It is a pull decoder so that
//! the caller can stop between two lines (client out of credit) and resume
//! later from the same bytes.

use std::io::Write as _;

/// Limits of one decoder, checked at the edge.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Status line plus headers.
    pub head_bytes_max: usize,
    /// One body line (one SSE `data:` line, i.e. one JSON event).
    pub line_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            head_bytes_max: 16 * 1024,
            line_bytes_max: 64 * 1024,
        }
    }
}

/// Headers at most in one response head.
const HEADERS_MAX: usize = 32;
/// Longest chunk-size line (hex digits, extensions, CRLF) accepted.
const CHUNK_LINE_BYTES_MAX: usize = 256;

/// Why a response could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed response head: {0}")]
    Head(String),
    #[error("response head longer than {0} bytes")]
    HeadTooLong(usize),
    #[error("malformed chunked encoding: {0}")]
    Chunked(&'static str),
    #[error("response line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("connection closed before the response ended")]
    Truncated,
    #[error("unsupported transfer-encoding: {0}")]
    Encoding(String),
}

/// The parts of a response head the client acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// `Content-Type` starts with `text/event-stream`.
    pub event_stream: bool,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
    pub body: BodyKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Chunked,
    Length(u64),
    /// Ends when the server closes the connection.
    UntilClose,
}

/// What [`ResponseDecoder::next`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// More input needed.
    Pending,
    Head(ResponseHead),
    /// One body line, without its line ending, in [`ResponseDecoder::line`].
    Line,
    /// The response is complete.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Head,
    ChunkSize,
    ChunkData {
        left: u64,
    },
    /// The CRLF after a chunk's data; `seen` bytes of it consumed.
    ChunkDataEnd {
        seen: u8,
    },
    /// Trailer lines after the last chunk, up to the empty line.
    Trailers,
    Length {
        left: u64,
    },
    UntilClose,
    /// The body is complete; a final unterminated line may still be due.
    BodyDone,
    Done,
}

/// Incremental decoder of one HTTP/1.1 response. Reusable: [`reset`] before
/// the next response on the same connection (keeps its buffers' capacity).
///
/// [`reset`]: ResponseDecoder::reset
#[derive(Debug)]
pub struct ResponseDecoder {
    limits: Limits,
    state: State,
    /// Head bytes so far, or the current chunk-size / trailer line.
    scratch: Vec<u8>,
    /// The current body line.
    line: Vec<u8>,
    line_ready: bool,
}

impl ResponseDecoder {
    pub fn new(limits: Limits) -> Self {
        assert!(limits.head_bytes_max >= 64 && limits.line_bytes_max >= 64);
        Self {
            limits,
            state: State::Head,
            scratch: Vec::with_capacity(1024),
            line: Vec::with_capacity(4096),
            line_ready: false,
        }
    }

    pub fn reset(&mut self) {
        self.state = State::Head;
        self.scratch.clear();
        self.line.clear();
        self.line_ready = false;
    }

    /// The line announced by the last [`Item::Line`].
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// True before any byte of the head arrived.
    pub fn is_fresh(&self) -> bool {
        self.state == State::Head && self.scratch.is_empty()
    }

    /// Consumes a prefix of `input` and reports at most one item. Returns the
    /// bytes consumed; call again with the rest while the item is not
    /// [`Item::Pending`].
    pub fn next(&mut self, input: &[u8]) -> Result<(usize, Item), HttpError> {
        if self.line_ready {
            self.line.clear();
            self.line_ready = false;
        }
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Head => {
                    let Some((n, head)) = self.head(rest)? else {
                        return Ok((input.len(), Item::Pending));
                    };
                    used += n;
                    return Ok((used, Item::Head(head)));
                }
                State::ChunkSize => {
                    let Some(n) = self.take_scratch_line(rest, CHUNK_LINE_BYTES_MAX)? else {
                        return Ok((input.len(), Item::Pending));
                    };
                    used += n;
                    let size = parse_chunk_size(&self.scratch)?;
                    self.scratch.clear();
                    self.state = if size == 0 {
                        State::Trailers
                    } else {
                        State::ChunkData { left: size }
                    };
                }
                State::ChunkData { left } => {
                    if rest.is_empty() {
                        return Ok((used, Item::Pending));
                    }
                    let avail = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let (n, got_line) = self.take_body(&rest[..avail])?;
                    used += n;
                    let left = left - n as u64;
                    self.state = if left == 0 {
                        State::ChunkDataEnd { seen: 0 }
                    } else {
                        State::ChunkData { left }
                    };
                    if got_line {
                        return Ok((used, Item::Line));
                    }
                }
                State::ChunkDataEnd { seen } => {
                    let Some(&b) = rest.first() else {
                        return Ok((used, Item::Pending));
                    };
                    let want = if seen == 0 { b'\r' } else { b'\n' };
                    if b != want {
                        return Err(HttpError::Chunked("chunk data not followed by CRLF"));
                    }
                    used += 1;
                    self.state = if seen == 0 {
                        State::ChunkDataEnd { seen: 1 }
                    } else {
                        State::ChunkSize
                    };
                }
                State::Trailers => {
                    let Some(n) = self.take_scratch_line(rest, self.limits.head_bytes_max)? else {
                        return Ok((input.len(), Item::Pending));
                    };
                    used += n;
                    let empty = self.scratch.is_empty();
                    self.scratch.clear();
                    if empty {
                        self.state = State::BodyDone;
                    }
                }
                State::Length { left } => {
                    if left == 0 {
                        self.state = State::BodyDone;
                        continue;
                    }
                    if rest.is_empty() {
                        return Ok((used, Item::Pending));
                    }
                    let avail = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    let (n, got_line) = self.take_body(&rest[..avail])?;
                    used += n;
                    self.state = State::Length { left: left - n as u64 };
                    if got_line {
                        return Ok((used, Item::Line));
                    }
                }
                State::UntilClose => {
                    if rest.is_empty() {
                        return Ok((used, Item::Pending));
                    }
                    let (n, got_line) = self.take_body(rest)?;
                    used += n;
                    if got_line {
                        return Ok((used, Item::Line));
                    }
                }
                State::BodyDone => {
                    self.state = State::Done;
                    if !self.line.is_empty() {
                        // A last line without its line ending.
                        self.line_ready = true;
                        return Ok((used, Item::Line));
                    }
                    return Ok((used, Item::End));
                }
                State::Done => return Ok((used, Item::End)),
            }
        }
    }

    /// The peer closed the connection. Completes a read-until-close body;
    /// anything else not yet complete is truncated.
    pub fn eof(&mut self) -> Result<Item, HttpError> {
        if self.line_ready {
            self.line.clear();
            self.line_ready = false;
        }
        match self.state {
            State::UntilClose | State::BodyDone => {
                self.state = State::BodyDone;
                self.next(&[]).map(|(_, item)| item)
            }
            State::Done => Ok(Item::End),
            _ => Err(HttpError::Truncated),
        }
    }

    fn head(&mut self, rest: &[u8]) -> Result<Option<(usize, ResponseHead)>, HttpError> {
        // Parse from the accumulated bytes when a head spans several reads,
        // in place from the input otherwise.
        let base = self.scratch.len();
        let parse_from_scratch = base > 0;
        if parse_from_scratch {
            let take = rest
                .len()
                .min(self.limits.head_bytes_max + 1 - base.min(self.limits.head_bytes_max));
            self.scratch.extend_from_slice(&rest[..take]);
        }
        // Never look past the bound: the outcome must not depend on how
        // the bytes were split.
        let cap = self.limits.head_bytes_max + 1;
        let buf: &[u8] = if parse_from_scratch {
            &self.scratch
        } else {
            &rest[..rest.len().min(cap)]
        };
        let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut resp = httparse::Response::new(&mut headers);
        let status = resp.parse(buf).map_err(|e| HttpError::Head(e.to_string()))?;
        let head_len = match status {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => {
                if buf.len() > self.limits.head_bytes_max {
                    return Err(HttpError::HeadTooLong(self.limits.head_bytes_max));
                }
                if !parse_from_scratch {
                    let keep = rest.len().min(cap);
                    self.scratch.extend_from_slice(&rest[..keep]);
                }
                return Ok(None);
            }
        };
        if head_len > self.limits.head_bytes_max {
            return Err(HttpError::HeadTooLong(self.limits.head_bytes_max));
        }
        let code = resp.code.ok_or_else(|| HttpError::Head("no status code".into()))?;
        let http11 = resp.version == Some(1);
        let mut chunked = false;
        let mut length = None;
        let mut event_stream = false;
        let mut keep_alive = http11;
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value).unwrap_or("").trim();
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                if value.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                } else if !value.eq_ignore_ascii_case("identity") {
                    return Err(HttpError::Encoding(value.chars().take(64).collect()));
                }
            } else if h.name.eq_ignore_ascii_case("content-length") {
                let n = value
                    .parse::<u64>()
                    .map_err(|_| HttpError::Head(format!("bad content-length {value:?}")))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HttpError::Head("conflicting content-length headers".into()));
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("content-type") {
                // Bytes, not a str slice: byte 17 may fall inside a character.
                event_stream =
                    (value.as_bytes().get(..17)).is_some_and(|v| v.eq_ignore_ascii_case(b"text/event-stream"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            }
        }
        let body = if chunked {
            BodyKind::Chunked
        } else if let Some(n) = length {
            BodyKind::Length(n)
        } else if code == 204 || code == 304 || (100..200).contains(&code) {
            BodyKind::Length(0)
        } else {
            keep_alive = false;
            BodyKind::UntilClose
        };
        self.state = match body {
            BodyKind::Chunked => State::ChunkSize,
            BodyKind::Length(left) => State::Length { left },
            BodyKind::UntilClose => State::UntilClose,
        };
        let used = if parse_from_scratch { head_len - base } else { head_len };
        self.scratch.clear();
        Ok(Some((
            used,
            ResponseHead {
                status: code,
                event_stream,
                keep_alive,
                body,
            },
        )))
    }

    /// Appends `rest` up to and including the first LF to `scratch`; returns
    /// the bytes consumed once the line is complete (LF and a trailing CR
    /// removed from `scratch`).
    fn take_scratch_line(&mut self, rest: &[u8], max: usize) -> Result<Option<usize>, HttpError> {
        match memchr_lf(rest) {
            Some(i) => {
                if self.scratch.len() + i > max {
                    return Err(HttpError::Chunked("line too long"));
                }
                self.scratch.extend_from_slice(&rest[..i]);
                if self.scratch.last() == Some(&b'\r') {
                    self.scratch.pop();
                }
                Ok(Some(i + 1))
            }
            None => {
                if self.scratch.len() + rest.len() > max {
                    return Err(HttpError::Chunked("line too long"));
                }
                self.scratch.extend_from_slice(rest);
                Ok(None)
            }
        }
    }

    /// Body bytes: appended to the current line up to its LF. Returns bytes
    /// consumed and whether a line is complete.
    fn take_body(&mut self, data: &[u8]) -> Result<(usize, bool), HttpError> {
        let (take, complete) = match memchr_lf(data) {
            Some(i) => (i, true),
            None => (data.len(), false),
        };
        if self.line.len() + take > self.limits.line_bytes_max {
            return Err(HttpError::LineTooLong(self.limits.line_bytes_max));
        }
        self.line.extend_from_slice(&data[..take]);
        if complete {
            if self.line.last() == Some(&b'\r') {
                self.line.pop();
            }
            self.line_ready = true;
            return Ok((take + 1, true));
        }
        Ok((take, false))
    }
}

fn memchr_lf(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    // Chunk extensions (";name=value") are allowed and ignored.
    let digits = line.split(|&b| b == b';').next().unwrap_or(&[]);
    let digits = trim_ascii(digits);
    if digits.is_empty() || digits.len() > 15 {
        return Err(HttpError::Chunked("bad chunk size"));
    }
    let mut size = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(HttpError::Chunked("bad chunk size")),
        };
        size = size * 16 + u64::from(v);
    }
    Ok(size)
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|c| !c.is_ascii_whitespace()).unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &b[start..end]
}

/// Writes the head of `POST /completion` for a JSON body of `body_len`
/// bytes.
pub fn write_completion_head(out: &mut Vec<u8>, host: &str, body_len: usize) {
    write_post_head(out, "/completion", host, body_len);
}

/// Writes the head of a streaming `POST path` for a JSON body of
/// `body_len` bytes (`/completion`, `/v1/chat/completions`).
pub fn write_post_head(out: &mut Vec<u8>, path: &str, host: &str, body_len: usize) {
    // Straight into the (reused) send buffer: no allocation per request
    // once it has grown to its working size.
    let _ = write!(
        out,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Accept: text/event-stream\r\nContent-Length: {body_len}\r\n\r\n"
    );
}

/// The complete `GET /health` request (connection closed after the answer).
pub fn health_request(host: &str) -> Vec<u8> {
    format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes()
}

#[cfg(test)]
mod tests;
