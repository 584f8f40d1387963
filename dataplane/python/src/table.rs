//! The tables of one connection: streams, pings and the handshake, each
//! a [`Key`] that callers poll. Polling takes what is ready (text, an END,
//! a PONG) or parks the caller as the key's waiter; the reader's events
//! take the waiter back ([`State::wake`]). Pure data: the locks, the socket
//! and the wake-ups are `core.rs`'s.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cnse_proto::Params;

use crate::error::SdkError;
use crate::utf8::Utf8Carry;

/// What a caller waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Key {
    /// The handshake.
    Ready,
    /// A stream: its next text (streaming) or its completion (collecting).
    Stream(u64),
    Ping(u32),
}

/// Who is parked on a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiter {
    None,
    Sync,
    Async,
}

pub enum Polled<T> {
    Ready(T),
    Pending,
}

/// The END facts of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndFacts {
    /// Finish reason: 0 length, 1 stop, 2 cancelled.
    pub reason: u32,
    /// Tokens the server says it sent (END `aux`).
    pub tokens: u64,
    pub ttft_us: u64,
    pub total_us: u64,
    /// END carried `END_FLAG_FAILED_OVER` (the SDK always asks for
    /// failover marks in HELLO).
    pub failed_over: bool,
}

/// What a ready key gives.
pub enum Value {
    Server {
        name: String,
        payload_bytes_max: u64,
    },
    /// Streaming: text that arrived since the last take (whole characters).
    Text(String),
    /// Streaming: the stream ended; the END facts and the whole text.
    End(EndFacts, String),
    /// Collecting: the whole text and the END facts.
    Completion(EndFacts, String),
    Rtt(Duration),
}

/// A frame to send once the state lock is released.
pub enum Frame {
    Request {
        id: u64,
        credit: u32,
        params: Params,
        prompt: String,
        /// A session key (docs/PROTOCOL.md, "Session keys").
        session: Option<String>,
    },
    Credit(u64, u32),
    Cancel(u64),
    Ping(u32, u64),
}

pub(crate) enum Phase {
    Connecting,
    Open { payload_bytes_max: u64, server: String },
    Failed(SdkError),
}

pub(crate) struct StreamState {
    /// Collecting (`generate`): tokens are taken on arrival and credit is
    /// granted back by the reader.
    pub collect: bool,
    pub window: u32,
    /// Credit granted so far (the initial window plus every CREDIT).
    pub granted: u64,
    /// Tokens received.
    pub tokens: u64,
    /// Streaming: text received and not yet taken, and its token count.
    pub text: String,
    pub pending_tokens: u32,
    /// Taken tokens not yet granted back.
    pub ungranted: u32,
    /// Everything received (the completion's text).
    pub full: String,
    pub utf8: Utf8Carry,
    pub end: Option<Result<EndFacts, SdkError>>,
    pub cancel_sent: bool,
    pub waiter: Waiter,
    /// Since when a waiter has seen no progress (the timeout's start).
    pub waiting_since: Option<Instant>,
}

pub(crate) struct PingState {
    pub sent: Instant,
    pub result: Option<Result<Duration, SdkError>>,
    pub waiter: Waiter,
    pub waiting_since: Option<Instant>,
}

pub(crate) struct State {
    pub phase: Phase,
    pub ready_waiter: Waiter,
    pub streams: HashMap<u64, StreamState>,
    pub next_stream_id: u64,
    pub pings: HashMap<u32, PingState>,
    pub next_ping: u32,
    /// Keys whose async waiter is to be woken (each at most once: a key
    /// is pushed when its waiter is taken).
    pub ready: Vec<Key>,
    /// The eventfd was signalled and not yet drained by the loop.
    pub wake_signalled: bool,
    /// Registered blocking waiters: the condvar is notified only if > 0.
    pub sync_waiters: usize,
    /// ERROR on stream 0: why the server is about to close the connection.
    pub conn_error: Option<SdkError>,
}

/// Credit goes back in steps of half the window (at least one token).
pub(crate) fn grant_step(window: u32) -> u32 {
    (window / 2).max(1)
}

impl State {
    pub fn usable(&self) -> Result<(), SdkError> {
        match &self.phase {
            Phase::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }

    /// Parks `waiter` on `slot` (keeping the count of blocking waiters).
    fn park(slot: &mut Waiter, waiter: Waiter, sync_waiters: &mut usize) {
        if *slot == Waiter::Sync {
            *sync_waiters -= 1;
        }
        if waiter == Waiter::Sync {
            *sync_waiters += 1;
        }
        *slot = waiter;
    }

    /// Takes the waiter of `key` after an event: blocking waiters are
    /// notified by the caller when this returns true, async ones are queued.
    pub fn wake(&mut self, key: Key) -> bool {
        let slot = match key {
            Key::Ready => Some(&mut self.ready_waiter),
            Key::Stream(id) => self.streams.get_mut(&id).map(|s| {
                s.waiting_since = None;
                &mut s.waiter
            }),
            Key::Ping(seq) => self.pings.get_mut(&seq).map(|p| {
                p.waiting_since = None;
                &mut p.waiter
            }),
        };
        let Some(slot) = slot else { return false };
        match std::mem::replace(slot, Waiter::None) {
            Waiter::None => false,
            Waiter::Sync => {
                self.sync_waiters -= 1;
                true
            }
            Waiter::Async => {
                self.ready.push(key);
                false
            }
        }
    }

    /// Removes the waiter of `key` without an event (its caller gave up:
    /// an exception, a cancelled task); its timeout starts afresh.
    pub fn unpark(&mut self, key: Key) {
        let Self {
            ready_waiter,
            streams,
            pings,
            sync_waiters,
            ..
        } = self;
        let slot = match key {
            Key::Ready => Some(ready_waiter),
            Key::Stream(id) => streams.get_mut(&id).map(|s| {
                s.waiting_since = None;
                &mut s.waiter
            }),
            Key::Ping(seq) => pings.get_mut(&seq).map(|p| {
                p.waiting_since = None;
                &mut p.waiter
            }),
        };
        if let Some(slot) = slot {
            State::park(slot, Waiter::None, sync_waiters);
        }
    }

    /// Polls `key`; when it is not ready, `waiter` is parked on it. A
    /// CREDIT to send may come back in `out`.
    pub fn poll(
        &mut self,
        key: Key,
        waiter: Waiter,
        now: Instant,
        out: &mut Option<Frame>,
    ) -> Polled<Result<Value, SdkError>> {
        let Self {
            phase,
            ready_waiter,
            streams,
            pings,
            sync_waiters,
            ..
        } = self;
        match key {
            Key::Ready => match phase {
                Phase::Open {
                    payload_bytes_max,
                    server,
                } => Polled::Ready(Ok(Value::Server {
                    name: server.clone(),
                    payload_bytes_max: *payload_bytes_max,
                })),
                Phase::Failed(e) => Polled::Ready(Err(e.clone())),
                Phase::Connecting => {
                    State::park(ready_waiter, waiter, sync_waiters);
                    Polled::Pending
                }
            },
            Key::Stream(id) => match streams.get_mut(&id) {
                Some(s) => poll_stream(id, s, waiter, now, sync_waiters, out),
                None => Polled::Ready(Err(SdkError::Usage(format!("stream {id} was released")))),
            },
            Key::Ping(seq) => match pings.get_mut(&seq) {
                Some(p) => match &p.result {
                    Some(r) => Polled::Ready(r.clone().map(Value::Rtt)),
                    None => {
                        State::park(&mut p.waiter, waiter, sync_waiters);
                        if waiter != Waiter::None {
                            p.waiting_since.get_or_insert(now);
                        }
                        Polled::Pending
                    }
                },
                None => Polled::Ready(Err(SdkError::Usage(format!("ping {seq} was released")))),
            },
        }
    }
}

fn poll_stream(
    id: u64,
    s: &mut StreamState,
    waiter: Waiter,
    now: Instant,
    sync_waiters: &mut usize,
    out: &mut Option<Frame>,
) -> Polled<Result<Value, SdkError>> {
    if s.collect {
        return match &s.end {
            // Taken once: the caller releases the stream right after.
            Some(Ok(facts)) => Polled::Ready(Ok(Value::Completion(*facts, std::mem::take(&mut s.full)))),
            Some(Err(e)) => Polled::Ready(Err(e.clone())),
            None => {
                State::park(&mut s.waiter, waiter, sync_waiters);
                if waiter != Waiter::None {
                    s.waiting_since.get_or_insert(now);
                }
                Polled::Pending
            }
        };
    }
    // Taken tokens are granted back, including tokens whose bytes are
    // still an incomplete character (else a small window could stall).
    if s.pending_tokens > 0 {
        s.ungranted += s.pending_tokens;
        s.pending_tokens = 0;
        if s.end.is_none() && s.ungranted >= grant_step(s.window) {
            *out = Some(Frame::Credit(id, s.ungranted));
            s.granted += u64::from(s.ungranted);
            s.ungranted = 0;
        }
    }
    if !s.text.is_empty() {
        State::park(&mut s.waiter, Waiter::None, sync_waiters);
        return Polled::Ready(Ok(Value::Text(std::mem::take(&mut s.text))));
    }
    match &s.end {
        // Taken once: the stream object keeps the completion it makes.
        Some(Ok(facts)) => Polled::Ready(Ok(Value::End(*facts, std::mem::take(&mut s.full)))),
        Some(Err(e)) => Polled::Ready(Err(e.clone())),
        None => {
            State::park(&mut s.waiter, waiter, sync_waiters);
            if waiter != Waiter::None {
                s.waiting_since.get_or_insert(now);
            }
            Polled::Pending
        }
    }
}
