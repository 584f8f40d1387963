//! A plain blocking client of llama-server's streaming `/completion`, with
//! the same request body and the same response/SSE decoding as the backend.
//! It is the baseline of the gateway-overhead benchmark (`cnse-dp bench
//! --target llama-http`): the same load straight to llama-server, one thread
//! and one keep-alive connection per concurrent stream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cnse_proto::{FinishReason, Params};

use crate::body::write_completion_body;
use crate::http::{self, Item, Limits, ResponseDecoder};
use crate::sse::{self, SseLine};
use crate::{parse_url, LlamaError, Target};

/// What one streamed completion gave.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub text: String,
    /// Tokens counted as the backend counts them (token ids per event).
    pub tokens: u64,
    /// Events that carried text (what becomes TOKENS frames).
    pub chunks: u64,
    pub finish: FinishReason,
    /// From sending the request to the first event with a token (what
    /// becomes the first TOKENS frame through cnse-dp).
    pub ttft: Option<Duration>,
    /// From sending the request to the last event.
    pub total: Duration,
}

/// A blocking llama-server client over one keep-alive connection.
pub struct Client {
    target: Target,
    stream: Option<TcpStream>,
    timeout: Duration,
    cache_prompt: bool,
    dec: ResponseDecoder,
    buf: Vec<u8>,
    send: Vec<u8>,
    body: Vec<u8>,
}

const READ_BUFFER_BYTES: usize = 16 * 1024;

impl Client {
    /// `timeout` bounds connect and every read.
    pub fn new(url: &str, timeout: Duration, cache_prompt: bool) -> Result<Self, LlamaError> {
        Ok(Self {
            target: parse_url(url)?,
            stream: None,
            timeout,
            cache_prompt,
            dec: ResponseDecoder::new(Limits::default()),
            buf: vec![0; READ_BUFFER_BYTES],
            send: Vec::with_capacity(4096),
            body: Vec::with_capacity(4096),
        })
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> LlamaError {
        LlamaError::Io {
            op,
            url: self.target.url.clone(),
            source,
        }
    }

    fn proto_err(&self, op: &'static str, reason: impl Into<String>) -> LlamaError {
        LlamaError::Protocol {
            op,
            url: self.target.url.clone(),
            reason: reason.into(),
        }
    }

    fn connect(&mut self) -> Result<(), LlamaError> {
        if self.stream.is_some() {
            return Ok(());
        }
        let s = TcpStream::connect_timeout(&self.target.addr, self.timeout).map_err(|e| self.io_err("connect", e))?;
        s.set_nodelay(true).map_err(|e| self.io_err("set TCP_NODELAY", e))?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(|e| self.io_err("set read timeout", e))?;
        self.stream = Some(s);
        Ok(())
    }

    /// Streams one completion; `on_tokens` sees each event that carries
    /// tokens (its text and token count) as it arrives. A pooled connection the server closed meanwhile is replaced
    /// once.
    pub fn complete(
        &mut self,
        params: &Params,
        prompt: &str,
        mut on_tokens: impl FnMut(&str, u32),
    ) -> Result<Completion, LlamaError> {
        self.body.clear();
        write_completion_body(&mut self.body, params, prompt, self.cache_prompt);
        self.send.clear();
        http::write_completion_head(&mut self.send, &self.target.authority, self.body.len());
        self.send.extend_from_slice(&self.body);
        let reused = self.stream.is_some();
        match self.exchange(&mut on_tokens) {
            Err(Retry) if reused => {
                self.stream = None;
                self.exchange(&mut on_tokens)
                    .map_err(|_| self.proto_err("completion", "connection closed"))?
            }
            Err(Retry) => Err(self.proto_err("completion", "connection closed before any answer")),
            Ok(r) => r,
        }
    }

    fn exchange(&mut self, on_tokens: &mut dyn FnMut(&str, u32)) -> Result<Result<Completion, LlamaError>, Retry> {
        if let Err(e) = self.connect() {
            return Ok(Err(e));
        }
        let sent_at = Instant::now();
        let stream = self.stream.as_mut().expect("connected");
        if stream.write_all(&self.send).is_err() {
            return Err(Retry);
        }
        self.dec.reset();
        let mut text = String::new();
        let mut tokens = 0u64;
        let mut chunks = 0u64;
        let mut ttft = None;
        let mut status = 0u16;
        let mut finish: Option<(FinishReason, Duration)> = None;
        let mut got_bytes = false;
        let mut keep_alive = true;
        loop {
            let stream = self.stream.as_mut().expect("connected");
            let n = match stream.read(&mut self.buf) {
                Ok(0) if !got_bytes => return Err(Retry),
                Ok(n) => n,
                Err(e) if !got_bytes && e.kind() == std::io::ErrorKind::ConnectionReset => return Err(Retry),
                Err(e) => {
                    self.stream = None;
                    return Ok(Err(self.io_err("read", e)));
                }
            };
            got_bytes = true;
            let mut pos = 0;
            loop {
                let step = if n == 0 {
                    self.dec.eof().map(|item| (0, item))
                } else {
                    self.dec.next(&self.buf[pos..n])
                };
                let (used, item) = match step {
                    Ok(r) => r,
                    Err(e) => {
                        self.stream = None;
                        return Ok(Err(self.proto_err("completion", e.to_string())));
                    }
                };
                pos += used;
                match item {
                    Item::Pending => break,
                    Item::Head(h) => {
                        status = h.status;
                        keep_alive = h.keep_alive;
                        if status == 200 && !h.event_stream {
                            self.stream = None;
                            return Ok(Err(self.proto_err("completion", "200 without an event stream")));
                        }
                    }
                    Item::Line if status != 200 => {
                        let msg = sse::status_message(status, self.dec.line());
                        self.stream = None;
                        return Ok(Err(self.proto_err("completion", msg)));
                    }
                    Item::Line => match sse::parse_line(self.dec.line()) {
                        Ok(SseLine::Event(e)) => {
                            // Counted as the backend counts (one per token
                            // id; text without ids is one token).
                            let count = e.token_count.max(u32::from(!e.content.is_empty()));
                            if count > 0 {
                                tokens += u64::from(count);
                                ttft.get_or_insert_with(|| sent_at.elapsed());
                                on_tokens(&e.content, count);
                            }
                            if !e.content.is_empty() {
                                chunks += 1;
                                text.push_str(&e.content);
                            }
                            if e.stop {
                                finish = Some((e.finish_reason(), sent_at.elapsed()));
                            }
                        }
                        Ok(SseLine::Skip) => {}
                        Ok(SseLine::Error(m)) => {
                            self.stream = None;
                            return Ok(Err(self.proto_err("completion", m)));
                        }
                        Err(m) => {
                            self.stream = None;
                            return Ok(Err(self.proto_err("completion", m)));
                        }
                    },
                    Item::End => {
                        if !keep_alive || n == 0 {
                            self.stream = None;
                        }
                        let Some((finish, total)) = finish else {
                            self.stream = None;
                            let msg = if status == 200 {
                                "response ended without a final event".to_string()
                            } else {
                                sse::status_message(status, b"")
                            };
                            return Ok(Err(self.proto_err("completion", msg)));
                        };
                        return Ok(Ok(Completion {
                            text,
                            tokens,
                            chunks,
                            finish,
                            ttft,
                            total,
                        }));
                    }
                }
            }
        }
    }
}

/// The pooled connection was closed by the server before any answer byte.
struct Retry;

/// The load of one benchmark run: a closed loop of `concurrency` streams.
#[derive(Debug, Clone)]
pub struct Load {
    pub params: Params,
    pub prompt: String,
    pub cache_prompt: bool,
    /// Bounds connect and each read.
    pub timeout: Duration,
    /// Run before the measurement (nothing recorded).
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
}

/// One request sent inside the measured window.
#[derive(Debug, Clone)]
pub struct Sample {
    pub ttft: Option<Duration>,
    pub total: Duration,
    pub tokens: u64,
}

/// What a load run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub window: Duration,
    /// Requests sent inside the window that completed.
    pub samples: Vec<Sample>,
    /// Tokens that arrived inside the window (any request).
    pub window_tokens: u64,
    /// Requests that completed inside the window.
    pub window_requests: u64,
    /// Failed requests, with their error.
    pub errors: Vec<String>,
}

/// Runs a closed loop of `concurrency` streams against `url` (one thread
/// and one keep-alive connection each, started together): each stream
/// sends its next request as soon as the previous one ends. Latencies are
/// recorded for requests sent after the warm-up; rates count tokens and
/// completions inside the measured window, as the CNSE load generator does.
/// A stream stops at its first failed request (recorded in `errors`).
pub fn run_load(url: &str, concurrency: usize, load: &Load) -> Result<LoadReport, LlamaError> {
    if concurrency == 0 || concurrency > CONCURRENCY_MAX {
        return Err(LlamaError::Config(format!("concurrency must be 1..={CONCURRENCY_MAX}")));
    }
    if load.duration.is_zero() {
        return Err(LlamaError::Config("duration must be > 0".into()));
    }
    parse_url(url)?;
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let mut handles = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let barrier = barrier.clone();
        let load = load.clone();
        let url = url.to_string();
        handles.push(std::thread::spawn(
            move || -> Result<(LoadReport, Instant), LlamaError> {
                let mut client = Client::new(&url, load.timeout, load.cache_prompt)?;
                let mut out = LoadReport::default();
                barrier.wait();
                let start = Instant::now();
                let (from, to) = (start + load.warmup, start + load.warmup + load.duration);
                while Instant::now() < to {
                    let sent = Instant::now();
                    let mut window_tokens = 0u64;
                    let r = client.complete(&load.params, &load.prompt, |_, n| {
                        let now = Instant::now();
                        if now >= from && now < to {
                            window_tokens += u64::from(n);
                        }
                    });
                    out.window_tokens += window_tokens;
                    let done = Instant::now();
                    match r {
                        Ok(c) => {
                            if done >= from && done < to {
                                out.window_requests += 1;
                            }
                            if sent >= from && sent < to {
                                out.samples.push(Sample {
                                    ttft: c.ttft,
                                    total: c.total,
                                    tokens: c.tokens,
                                });
                            }
                        }
                        Err(e) => {
                            // A failing target is not measured: this stream
                            // stops rather than spin on refusals.
                            out.errors.push(e.to_string());
                            break;
                        }
                    }
                }
                Ok((out, start))
            },
        ));
    }
    barrier.wait();
    let mut all = LoadReport {
        window: load.duration,
        ..LoadReport::default()
    };
    for h in handles {
        let (part, _) = h
            .join()
            .map_err(|_| LlamaError::Config("a load thread panicked".into()))??;
        all.samples.extend(part.samples);
        all.window_tokens += part.window_tokens;
        all.window_requests += part.window_requests;
        all.errors.extend(part.errors);
    }
    Ok(all)
}

/// Streams of one load run at most (one thread each).
pub const CONCURRENCY_MAX: usize = 1024;
