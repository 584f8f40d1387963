//! The OpenAI-compatible HTTP/1.1 front, on the same session as the binary
//! protocol: an HTTP connection is a connection slot whose input is parsed
//! as requests (`parse.rs`) and whose streams are framed as server-sent
//! events or one JSON body (`openai.rs`, `respond.rs`). Admission,
//! scheduling, backpressure (a slow reader pauses its stream), timeouts and
//! cancellation (a client that disconnects frees the backend's work) are the
//! binary protocol's.
//!
//! Pipelining: up to `PIPELINE_MAX` generation requests of a connection run
//! at once; responses go out strictly in request order (a later stream
//! takes no tokens until the ones before it are written: its queue bound
//! pauses its backend meanwhile). A request answered on the spot (health,
//! models, metrics, an error) waits until nothing is in flight.

use std::time::Instant;

use cnse_proto::{code, Request};

use crate::conn::{ConnState, Proto};
use crate::session::{Admitted, Session, DRAIN_TIMEOUT};
use crate::stream::Credit;
use crate::transport::Transport;

pub(crate) mod openai;
pub mod parse;
mod respond;

use openai::Kind;
use parse::{Auth, Method, Route, SessionHeader};

/// A connection's HTTP side.
#[derive(Debug, Default)]
pub struct HttpConn {
    /// Received bytes not yet answered (a partial request, or pipelined
    /// ones waiting for the current response).
    pub inbuf: Vec<u8>,
    /// A chunked body, decoded.
    pub body: Vec<u8>,
    /// Generation requests accepted and not yet answered.
    pub active: u32,
    /// Sequence numbers: the next accepted request's, and the one whose
    /// response is being written.
    pub next_seq: u64,
    pub out_seq: u64,
    /// Close once the current response is out.
    pub close_after: bool,
    /// When the first byte of the request not yet complete arrived.
    pub started: Option<Instant>,
    /// Accepted on the metrics-only listener: `/metrics` and `/health`.
    pub metrics_only: bool,
}

impl HttpConn {
    pub fn reset(&mut self) {
        self.inbuf.clear();
        self.body.clear();
        self.active = 0;
        self.next_seq = 0;
        self.out_seq = 0;
        self.close_after = false;
        self.started = None;
        self.metrics_only = false;
    }

    pub fn capacity(&self) -> usize {
        self.inbuf.capacity() + self.body.capacity()
    }
}

/// A stream's HTTP side (inert for binary-protocol streams).
#[derive(Debug)]
pub struct HttpStream {
    pub kind: Kind,
    /// Server-sent events (`stream: true`), else one JSON body at the end.
    pub sse: bool,
    pub include_usage: bool,
    /// The chat role went out with the first chunk.
    pub first_sent: bool,
    /// Text produced and not yet written: held back while it may be the
    /// start of a stop sequence or ends inside a UTF-8 character; for a
    /// JSON body, all of it.
    pub text: Vec<u8>,
    pub stops: Vec<String>,
    /// A stop sequence matched: finish reason `stop`.
    pub stopped: bool,
    pub prompt_tokens: u64,
    pub id: u64,
    pub created: u64,
    /// Its place in the connection's order, and whether its status line
    /// went out.
    pub seq: u64,
    pub head_sent: bool,
    /// A chat request: `messages` holds its messages as a JSON array.
    pub chat: bool,
    pub messages: String,
}

impl Default for HttpStream {
    fn default() -> Self {
        HttpStream {
            kind: Kind::Completion,
            sse: false,
            include_usage: false,
            first_sent: false,
            text: Vec::new(),
            stops: Vec::new(),
            stopped: false,
            prompt_tokens: 0,
            id: 0,
            created: 0,
            seq: 0,
            head_sent: false,
            chat: false,
            messages: String::new(),
        }
    }
}

/// Generation requests one connection may have in flight (pipelined).
const PIPELINE_MAX: u32 = 16;

/// Bytes an HTTP connection may hold unanswered: one largest request.
fn inbuf_max(payload_bytes_max: u32) -> usize {
    parse::HEAD_BYTES_MAX + payload_bytes_max as usize + 64 * 1024
}

/// The HTTP status that answers a protocol error code.
pub(crate) fn status_of(code_: u32) -> u16 {
    match code_ {
        code::BAD_REQUEST => 400,
        code::UNAUTHORIZED => 401,
        code::PAYLOAD_TOO_LARGE => 413,
        code::OVERLOADED => 429,
        code::SHUTTING_DOWN => 503,
        code::BACKEND_TIMEOUT => 504,
        c if (400..600).contains(&c) => c as u16,
        _ => 500,
    }
}

impl<T: Transport> Session<T> {
    /// A new HTTP connection on `fd` (`--http-listen`): no handshake, it is
    /// open at once.
    pub fn on_accept_http(&mut self, fd: std::os::fd::RawFd) -> Option<u32> {
        let slot = self.on_accept(fd)?;
        let c = &mut self.tables.conns[slot as usize];
        c.proto = Proto::Http;
        c.state = ConnState::Open;
        c.http.reset();
        Some(slot)
    }

    /// A new connection on the metrics-only listener (`--metrics-listen`).
    pub fn on_accept_metrics(&mut self, fd: std::os::fd::RawFd) -> Option<u32> {
        let slot = self.on_accept_http(fd)?;
        self.tables.conns[slot as usize].http.metrics_only = true;
        Some(slot)
    }

    /// Bytes received on an HTTP connection.
    pub(crate) fn http_input(&mut self, slot: u32, data: &[u8]) {
        let max = inbuf_max(self.tables.cfg.payload_bytes_max);
        let now = self.tables.now;
        let c = &mut self.tables.conns[slot as usize];
        if c.http.inbuf.len() + data.len() > max {
            c.http.inbuf.clear();
            self.http_fatal(slot, 413, "request too large");
            return;
        }
        if c.http.inbuf.is_empty() {
            c.http.started = Some(now);
        }
        c.http.inbuf.extend_from_slice(data);
        self.http_drive(slot);
        self.tables.account_conn(slot);
        self.tables.mark_dirty(slot);
    }

    /// Takes the buffered requests in order: generation requests into the
    /// pipeline, anything answered on the spot once the pipeline is empty.
    pub(crate) fn http_drive(&mut self, slot: u32) {
        loop {
            let c = &mut self.tables.conns[slot as usize];
            if c.state != ConnState::Open
                || c.http.inbuf.is_empty()
                || c.http.close_after
                || c.http.active >= PIPELINE_MAX
            {
                return;
            }
            let head = match parse::head(&c.http.inbuf) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => return self.http_fatal(slot, e.status, e.message),
            };
            let max = self.tables.cfg.payload_bytes_max as usize;
            let c = &mut self.tables.conns[slot as usize];
            let mut body = std::mem::take(&mut c.http.body);
            let used = match parse::body(&c.http.inbuf, &head, max, &mut body) {
                Ok(Some(n)) => n,
                Ok(None) => {
                    c.http.body = body;
                    return;
                }
                Err(e) => {
                    c.http.body = body;
                    return self.http_fatal(slot, e.status, e.message);
                }
            };
            let inbuf = std::mem::take(&mut self.tables.conns[slot as usize].http.inbuf);
            let body_bytes: &[u8] = match head.body {
                parse::BodyKind::Length(n) => &inbuf[head.len..head.len + n],
                parse::BodyKind::Chunked => &body,
                parse::BodyKind::None => &[],
            };
            let taken = self.http_request(slot, &head, &inbuf, body_bytes);
            let c = &mut self.tables.conns[slot as usize];
            c.http.body = body;
            c.http.inbuf = inbuf;
            if !taken {
                // Answered on the spot, but responses are still being
                // written: it waits for them (parsed again then).
                return;
            }
            self.tables.n.frames_in += 1;
            let c = &mut self.tables.conns[slot as usize];
            c.http.inbuf.drain(..used);
            c.http.started = (!c.http.inbuf.is_empty()).then_some(self.tables.now);
            if !head.keep_alive {
                // Nothing after it is read; close once it is answered.
                c.http.close_after = true;
                if c.http.active == 0 {
                    return self.http_close_after_output(slot);
                }
                return;
            }
        }
    }

    /// Handles one request; false when it must wait for the responses in
    /// flight (it would be answered on the spot).
    fn http_request(&mut self, slot: u32, head: &parse::Head, raw: &[u8], body: &[u8]) -> bool {
        let pipelined = self.tables.conns[slot as usize].http.active > 0;
        let generation =
            matches!(head.route, Route::Completions | Route::ChatCompletions) && head.method == Method::Post;
        if pipelined && !generation {
            return false;
        }
        self.http_answer(slot, head, raw, body, pipelined)
    }

    fn http_answer(&mut self, slot: u32, head: &parse::Head, raw: &[u8], body: &[u8], pipelined: bool) -> bool {
        let (mut route, method) = (head.route, head.method);
        if self.tables.conns[slot as usize].http.metrics_only && !matches!(route, Route::Metrics | Route::Health) {
            route = Route::Unknown;
        }
        let wanted = match route {
            Route::Completions | Route::ChatCompletions => Method::Post,
            Route::Models | Route::Health | Route::Metrics => Method::Get,
            Route::Unknown => {
                self.http_respond_error(slot, 404, "no such endpoint");
                return true;
            }
        };
        if method != wanted {
            self.http_respond_error(slot, 405, "method not allowed on this endpoint");
            return true;
        }
        if route != Route::Health {
            if let Some(key) = &self.auth {
                let ok = match head.auth {
                    Auth::Bearer { at, len } => key.verify(&raw[at..at + len]),
                    Auth::Missing | Auth::Malformed => false,
                };
                if !ok {
                    if pipelined {
                        return false;
                    }
                    self.http_respond_error(slot, 401, "missing or wrong API key (Authorization: Bearer KEY)");
                    return true;
                }
            }
        }
        match route {
            Route::Health => self.http_respond(slot, 200, "application/json", b"{\"status\":\"ok\"}"),
            Route::Models => {
                let mut b = std::mem::take(&mut self.tables.http_scratch);
                b.clear();
                let cfg = self.tables.cfg.clone();
                openai::models(&mut b, &cfg.model_name, &cfg.store_names, self.started_unix);
                self.http_respond(slot, 200, "application/json", &b);
                self.tables.http_scratch = b;
            }
            Route::Metrics => {
                let mut b = std::mem::take(&mut self.tables.http_scratch);
                b.clear();
                self.metrics_text(&mut b);
                self.http_respond(slot, 200, "text/plain; version=0.0.4", &b);
                self.tables.http_scratch = b;
            }
            Route::Completions | Route::ChatCompletions => {
                let session = match head.session {
                    SessionHeader::Missing => None,
                    SessionHeader::Key { at, len } => std::str::from_utf8(&raw[at..at + len]).ok(),
                    SessionHeader::Invalid if pipelined => return false,
                    SessionHeader::Invalid => {
                        self.tables.metrics.outcome(true, crate::metrics::Outcome::Rejected);
                        self.http_respond_error(
                            slot,
                            400,
                            "invalid X-Session-Id: one header of 1-256 visible ASCII characters",
                        );
                        return true;
                    }
                };
                let kind = if route == Route::Completions {
                    Kind::Completion
                } else {
                    Kind::Chat
                };
                return self.http_generate(slot, kind, body, session, pipelined);
            }
            Route::Unknown => unreachable!("answered above"),
        }
        true
    }

    /// Schedules a completion; false when it must wait (refused while
    /// responses are in flight: the refusal is answered in order later).
    fn http_generate(&mut self, slot: u32, kind: Kind, body: &[u8], session: Option<&str>, pipelined: bool) -> bool {
        let limit = self.tables.cfg.max_tokens_limit;
        let mut prompt = std::mem::take(&mut self.tables.http_prompt);
        let parsed = match openai::parse(body, kind == Kind::Chat, limit, &mut prompt) {
            Ok(p) => p,
            Err(_) if pipelined => {
                self.tables.http_prompt = prompt;
                return false;
            }
            Err(m) => {
                self.tables.http_prompt = prompt;
                self.tables.metrics.outcome(true, crate::metrics::Outcome::Rejected);
                self.http_respond_error(slot, 400, &m);
                return true;
            }
        };
        if self.shutting_down.is_some() {
            self.tables.http_prompt = prompt;
            if pipelined {
                return false;
            }
            self.http_respond_error(slot, 503, "server shutting down");
            return true;
        }
        // Response ids (`cmpl-N`) unique in the process: the worker in the
        // top bits, a count below.
        self.tables.http_ids += 1;
        let id = (self.tables.worker as u64) << 40 | self.tables.http_ids;
        let admitted = Admitted {
            stream_id: id,
            credit: Credit::Unlimited,
            req: Request {
                params: parsed.params,
                prompt: &prompt,
            },
            chat: parsed.messages.as_deref(),
            session,
        };
        let scheduled = self.schedule(slot, admitted);
        let prompt_tokens = openai::prompt_tokens(&prompt);
        self.tables.http_prompt = prompt;
        if let Err((code_, message)) = scheduled {
            if pipelined {
                return false;
            }
            self.tables.n.rejected += 1;
            self.tables.metrics.outcome(true, crate::metrics::Outcome::Rejected);
            self.http_respond_error(slot, status_of(code_), message);
            return true;
        }
        let sslot = self.tables.conns[slot as usize]
            .streams
            .last()
            .expect("schedule added the stream")
            .1;
        let created = self.unix_now();
        let s = &mut self.tables.streams[sslot as usize];
        let h = &mut s.http;
        h.kind = kind;
        h.sse = parsed.stream;
        h.include_usage = parsed.include_usage;
        h.first_sent = false;
        h.text.clear();
        h.stops = parsed.stops;
        h.stopped = false;
        h.prompt_tokens = prompt_tokens;
        h.id = id;
        h.created = created;
        h.head_sent = false;
        let c = &mut self.tables.conns[slot as usize];
        h.seq = c.http.next_seq;
        c.http.next_seq += 1;
        c.http.active += 1;
        self.tables.mark_dirty(slot);
        true
    }

    /// A complete response with a body.
    fn http_respond(&mut self, slot: u32, status: u16, content_type: &str, body: &[u8]) {
        let c = &mut self.tables.conns[slot as usize];
        respond::head(
            &mut c.out_fill,
            status,
            content_type,
            Some(body.len()),
            !c.http.close_after,
        );
        c.out_fill.extend_from_slice(body);
        self.tables.n.frames_out += 1;
        self.tables.mark_dirty(slot);
    }

    /// An OpenAI-shaped error response; the connection stays open.
    pub(crate) fn http_respond_error(&mut self, slot: u32, status: u16, message: &str) {
        self.log_refusal("HTTP request refused", u32::from(status), message);
        self.tables.metrics.error(u32::from(status));
        let mut b = std::mem::take(&mut self.tables.http_scratch);
        b.clear();
        openai::error_body(&mut b, status, message);
        self.http_respond(slot, status, "application/json", &b);
        self.tables.http_scratch = b;
    }

    /// A request that cannot be framed (malformed, too large): answer, then
    /// close, since what follows in the input cannot be trusted.
    fn http_fatal(&mut self, slot: u32, status: u16, message: &str) {
        self.tables.n.violations += 1;
        let c = &mut self.tables.conns[slot as usize];
        c.http.inbuf.clear();
        c.http.close_after = true;
        if c.http.active > 0 {
            // Responses are streaming: an error cannot be put in order; close.
            return self.close_conn(slot);
        }
        self.http_respond_error(slot, status, message);
        self.http_close_after_output(slot);
    }

    /// Sends what is queued, then closes (a draining connection).
    pub(crate) fn http_close_after_output(&mut self, slot: u32) {
        let deadline = self.tables.now + DRAIN_TIMEOUT;
        let c = &mut self.tables.conns[slot as usize];
        if c.state == ConnState::Open {
            c.state = ConnState::Draining { deadline };
        }
        self.tables.mark_dirty(slot);
    }

    /// A request that did not arrive whole within the handshake timeout.
    pub(crate) fn http_timeout(&mut self, slot: u32) {
        self.http_fatal(slot, 408, "request not received in time");
    }

    /// The Prometheus text of `GET /metrics`.
    fn metrics_text(&self, out: &mut Vec<u8>) {
        match &self.metrics {
            Some(render) => render(out),
            None => crate::metrics::render(out, &[self.counters()], &[self.request_metrics()]),
        }
    }
}
