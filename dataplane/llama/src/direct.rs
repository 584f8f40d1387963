//! A plain blocking client of llama-server's streaming `/completion`, with
//! the same request body and the same response/SSE decoding as the backend.
//! It is the baseline of the gateway-overhead benchmark (`cnse-dp bench
//! --target llama-http`): the same load straight to llama-server, one thread
//! and one keep-alive connection per concurrent stream.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
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

    /// Streams one completion; `on_text` sees each event's text as it
    /// arrives. A pooled connection the server closed meanwhile is replaced
    /// once.
    pub fn complete(
        &mut self,
        params: &Params,
        prompt: &str,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion, LlamaError> {
        self.body.clear();
        write_completion_body(&mut self.body, params, prompt, self.cache_prompt);
        self.send.clear();
        http::write_completion_head(&mut self.send, &self.target.authority, self.body.len());
        self.send.extend_from_slice(&self.body);
        let reused = self.stream.is_some();
        match self.exchange(&mut on_text) {
            Err(Retry) if reused => {
                self.stream = None;
                self.exchange(&mut on_text)
                    .map_err(|_| self.proto_err("completion", "connection closed"))?
            }
            Err(Retry) => Err(self.proto_err("completion", "connection closed before any answer")),
            Ok(r) => r,
        }
    }

    fn exchange(&mut self, on_text: &mut dyn FnMut(&str)) -> Result<Result<Completion, LlamaError>, Retry> {
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
                            }
                            if !e.content.is_empty() {
                                chunks += 1;
                                text.push_str(&e.content);
                                on_text(&e.content);
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

/// The load of one benchmark run.
#[derive(Debug, Clone)]
pub struct Load {
    pub params: Params,
    pub prompt: String,
    pub cache_prompt: bool,
    /// Bounds connect and each read.
    pub timeout: Duration,
}

/// One request of a load run.
#[derive(Debug, Clone)]
pub struct RequestResult {
    /// When the request was sent, from the start of the run.
    pub sent_at: Duration,
    pub outcome: Result<Completion, String>,
}

/// Runs `requests` streamed completions against `url`, `concurrency` at a
/// time (one thread and one keep-alive connection each, started together).
/// Results are in request order.
pub fn run_load(url: &str, concurrency: usize, requests: usize, load: &Load) -> Result<Vec<RequestResult>, LlamaError> {
    if concurrency == 0 {
        return Err(LlamaError::Config("concurrency must be > 0".into()));
    }
    parse_url(url)?;
    let next = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(concurrency));
    let start = Instant::now();
    let mut handles = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let next = next.clone();
        let barrier = barrier.clone();
        let load = load.clone();
        let url = url.to_string();
        handles.push(std::thread::spawn(
            move || -> Result<Vec<(usize, RequestResult)>, LlamaError> {
                let mut client = Client::new(&url, load.timeout, load.cache_prompt)?;
                let mut out = Vec::new();
                barrier.wait();
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= requests {
                        return Ok(out);
                    }
                    let sent_at = start.elapsed();
                    let outcome = client
                        .complete(&load.params, &load.prompt, |_| {})
                        .map_err(|e| e.to_string());
                    out.push((k, RequestResult { sent_at, outcome }));
                }
            },
        ));
    }
    let mut all = Vec::with_capacity(requests);
    for h in handles {
        let part = h
            .join()
            .map_err(|_| LlamaError::Config("a load thread panicked".into()))??;
        all.extend(part);
    }
    all.sort_by_key(|(k, _)| *k);
    Ok(all.into_iter().map(|(_, r)| r).collect())
}
