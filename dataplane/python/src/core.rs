//! The connection core, free of Python: one TCP connection, one reader
//! thread that owns its receiving half (`reader.rs`), a table of streams
//! and pings, and a sending half behind a mutex. Callers poll a [`Key`]:
//! the answer is ready now, or the caller is registered as a waiter and the
//! reader wakes it (a condvar for blocking callers, an eventfd that the
//! asyncio loop watches for async ones) once per batch of frames.
//!
//! Bounds: [`STREAMS_MAX`] streams and [`PINGS_MAX`] pings per connection;
//! a stream buffers at most its credit window of tokens, because credit is
//! granted back only as the caller takes tokens (collecting streams take
//! them on arrival); frames queued before the handshake are at most
//! [`PENDING_FRAMES_MAX`]. Locks are never nested and never held across a
//! socket write or a call into Python.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cnse_client::{HelloAck, Writer};
use cnse_proto::{code, Params, PARAMS_BYTES};

use crate::error::SdkError;
use crate::utf8::Utf8Carry;

/// Streams tracked per connection (open, or ended and not yet released).
pub const STREAMS_MAX: usize = 4096;
/// Pings in flight per connection.
pub const PINGS_MAX: usize = 1024;
/// Largest credit window (tokens); the server buffers far fewer per stream.
pub const WINDOW_MAX: u32 = 65_536;
/// Frames queued while the handshake is under way.
pub const PENDING_FRAMES_MAX: usize = STREAMS_MAX + PINGS_MAX;

#[derive(Debug, Clone)]
pub struct Config {
    pub addr: String,
    pub auth_key: Vec<u8>,
    /// How long a waiting stream or ping may see nothing; `None`: forever.
    pub timeout: Option<Duration>,
    /// Bounds connecting, the handshake and every write.
    pub connect_timeout: Duration,
}

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

pub(crate) enum WriterSlot {
    /// Before the handshake: frames wait here, in order.
    Pending(Vec<Frame>),
    Open {
        w: Writer,
        payload_bytes_max: u64,
    },
    Closed,
}

pub struct Core {
    pub(crate) cfg: Config,
    pub(crate) state: Mutex<State>,
    pub(crate) cond: Condvar,
    pub(crate) writer: Mutex<WriterSlot>,
    pub(crate) wake: EventFd,
    pub(crate) started: Instant,
}

/// Credit goes back in steps of half the window (at least one token).
pub(crate) fn grant_step(window: u32) -> u32 {
    (window / 2).max(1)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens under these locks; if one did, the data is
    // still consistent enough to fail the connection cleanly.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    fn usable(&self) -> Result<(), SdkError> {
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
            Some(Ok(facts)) => Polled::Ready(Ok(Value::Completion(*facts, s.full.clone()))),
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
        Some(Ok(facts)) => Polled::Ready(Ok(Value::End(*facts, s.full.clone()))),
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

impl Core {
    pub(crate) fn new(cfg: Config) -> Result<Core, SdkError> {
        Ok(Core {
            cfg,
            state: Mutex::new(State {
                phase: Phase::Connecting,
                ready_waiter: Waiter::None,
                streams: HashMap::new(),
                next_stream_id: 1,
                pings: HashMap::new(),
                next_ping: 0,
                ready: Vec::new(),
                wake_signalled: false,
                sync_waiters: 0,
                conn_error: None,
            }),
            cond: Condvar::new(),
            writer: Mutex::new(WriterSlot::Pending(Vec::new())),
            wake: EventFd::new().map_err(|e| SdkError::Connect(format!("creating an eventfd: {e}")))?,
            started: Instant::now(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The eventfd an asyncio loop watches; readable when async waiters
    /// are to be woken ([`Core::take_ready`]).
    pub fn wake_fd(&self) -> RawFd {
        self.wake.fd.as_raw_fd()
    }

    /// Polls once; `Waiter::None` never parks.
    pub fn poll(&self, key: Key, waiter: Waiter) -> Polled<Result<Value, SdkError>> {
        let mut out = None;
        let r = self.lock().poll(key, waiter, Instant::now(), &mut out);
        if let Some(f) = out {
            // A failed send fails the connection; the next poll reports it.
            let _ = self.send(f);
        }
        r
    }

    /// Blocks up to `slice` for `key`; `None` when it is still pending:
    /// the caller checks for signals and comes back, still parked (so the
    /// timeout runs across slices), or calls [`Core::unpark`] if it gives up.
    pub fn wait(&self, key: Key, slice: Duration) -> Option<Result<Value, SdkError>> {
        let deadline = Instant::now() + slice;
        let mut st = self.lock();
        loop {
            let mut out = None;
            let polled = st.poll(key, Waiter::Sync, Instant::now(), &mut out);
            if let Some(f) = out {
                drop(st);
                let _ = self.send(f);
                st = self.lock();
            }
            if let Polled::Ready(r) = polled {
                st.unpark(key);
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            st = self
                .cond
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// The connection ended (closed, failed or lost).
    pub fn is_failed(&self) -> bool {
        matches!(self.lock().phase, Phase::Failed(_))
    }

    /// Removes a waiter that gave up (its caller failed before waiting).
    pub fn unpark(&self, key: Key) {
        self.lock().unpark(key);
    }

    /// Starts a stream: REQUEST with the window as initial credit.
    pub fn open_stream(&self, params: Params, prompt: String, window: u32, collect: bool) -> Result<u64, SdkError> {
        if window == 0 || window > WINDOW_MAX {
            return Err(SdkError::Usage(format!(
                "window must be 1..={WINDOW_MAX} tokens, got {window}"
            )));
        }
        let id = {
            let mut st = self.lock();
            st.usable()?;
            if st.streams.len() >= STREAMS_MAX {
                return Err(SdkError::Local {
                    code: code::OVERLOADED,
                    message: format!("{STREAMS_MAX} streams are held on this connection"),
                });
            }
            let id = st.next_stream_id;
            st.next_stream_id += 1;
            st.streams.insert(
                id,
                StreamState {
                    collect,
                    window,
                    granted: u64::from(window),
                    tokens: 0,
                    text: String::new(),
                    pending_tokens: 0,
                    ungranted: 0,
                    full: String::new(),
                    utf8: Utf8Carry::default(),
                    end: None,
                    cancel_sent: false,
                    waiter: Waiter::None,
                    waiting_since: None,
                },
            );
            id
        };
        let frame = Frame::Request {
            id,
            credit: window,
            params,
            prompt,
        };
        if let Err(e) = self.send(frame) {
            self.lock().streams.remove(&id);
            return Err(e);
        }
        Ok(id)
    }

    /// Asks the server to stop a stream; it still ends with END (reason 2).
    pub fn cancel(&self, id: u64) -> Result<(), SdkError> {
        {
            let mut st = self.lock();
            match st.streams.get_mut(&id) {
                Some(s) if s.end.is_none() && !s.cancel_sent => s.cancel_sent = true,
                _ => return Ok(()),
            }
        }
        self.send(Frame::Cancel(id))
    }

    /// Forgets a stream; one still open is cancelled.
    pub fn release(&self, id: u64) {
        let open = {
            let mut st = self.lock();
            let Some(s) = st.streams.remove(&id) else { return };
            if s.waiter == Waiter::Sync {
                st.sync_waiters -= 1;
            }
            s.end.is_none() && !s.cancel_sent
        };
        if open {
            let _ = self.send(Frame::Cancel(id));
        }
    }

    /// Tokens received on a stream so far.
    pub fn stream_tokens(&self, id: u64) -> u64 {
        self.lock().streams.get(&id).map_or(0, |s| s.tokens)
    }

    /// Sends a PING; its PONG is polled under `Key::Ping(seq)`.
    pub fn ping_start(&self) -> Result<u32, SdkError> {
        let seq = {
            let mut st = self.lock();
            st.usable()?;
            if st.pings.len() >= PINGS_MAX {
                return Err(SdkError::Local {
                    code: code::OVERLOADED,
                    message: format!("{PINGS_MAX} pings are in flight on this connection"),
                });
            }
            let mut seq = st.next_ping;
            while st.pings.contains_key(&seq) {
                seq = seq.wrapping_add(1);
            }
            st.next_ping = seq.wrapping_add(1);
            st.pings.insert(
                seq,
                PingState {
                    sent: Instant::now(),
                    result: None,
                    waiter: Waiter::None,
                    waiting_since: None,
                },
            );
            seq
        };
        let stamp_ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Err(e) = self.send(Frame::Ping(seq, stamp_ns)) {
            self.ping_release(seq);
            return Err(e);
        }
        Ok(seq)
    }

    pub fn ping_release(&self, seq: u32) {
        let mut st = self.lock();
        if let Some(p) = st.pings.remove(&seq) {
            if p.waiter == Waiter::Sync {
                st.sync_waiters -= 1;
            }
        }
    }

    /// Async keys woken since the last call, into `keys` (cleared first);
    /// drains the eventfd.
    pub fn take_ready(&self, keys: &mut Vec<Key>) {
        self.wake.drain();
        keys.clear();
        let mut st = self.lock();
        st.wake_signalled = false;
        std::mem::swap(keys, &mut st.ready);
    }

    /// Sends (or, before the handshake, queues) one frame. A failed write
    /// fails the whole connection: a frame may be half on the wire.
    pub fn send(&self, frame: Frame) -> Result<(), SdkError> {
        let mut slot = lock(&self.writer);
        let err = match &mut *slot {
            WriterSlot::Pending(queue) => {
                if queue.len() >= PENDING_FRAMES_MAX {
                    return Err(SdkError::Local {
                        code: code::OVERLOADED,
                        message: format!("{PENDING_FRAMES_MAX} frames wait for the handshake"),
                    });
                }
                queue.push(frame);
                return Ok(());
            }
            WriterSlot::Closed => {
                drop(slot);
                return Err(self.lock().usable().err().unwrap_or(SdkError::Closed));
            }
            WriterSlot::Open { w, payload_bytes_max } => match write_frame(w, &frame, *payload_bytes_max) {
                Ok(()) => return Ok(()),
                Err(e @ SdkError::Local { .. }) => return Err(e),
                Err(e) => {
                    let _ = w.shutdown();
                    e
                }
            },
        };
        *slot = WriterSlot::Closed;
        drop(slot);
        self.fail_all(err.clone());
        Err(err)
    }

    /// Closes the connection; every stream and ping still waiting fails.
    pub fn close(&self) {
        self.shut(SdkError::Closed);
    }

    /// Fails everything with `err`, then closes the socket (which wakes
    /// the reader). In this order `err` is the error callers see, not the
    /// reader's "closed" that the shutdown causes.
    pub(crate) fn shut(&self, err: SdkError) {
        self.fail_all(err);
        let old = std::mem::replace(&mut *lock(&self.writer), WriterSlot::Closed);
        if let WriterSlot::Open { w, .. } = &old {
            let _ = w.shutdown();
        }
    }

    /// The handshake is done: frames queued meanwhile go out in order (a
    /// REQUEST over the payload limit fails its stream instead), and
    /// pollers of [`Key::Ready`] are woken.
    pub(crate) fn open(&self, mut w: Writer, ack: &HelloAck) -> Result<(), SdkError> {
        let mut slot = lock(&self.writer);
        let queue = match std::mem::replace(&mut *slot, WriterSlot::Closed) {
            WriterSlot::Pending(queue) => queue,
            // Closed while the handshake was under way.
            WriterSlot::Closed | WriterSlot::Open { .. } => {
                let _ = w.shutdown();
                return Err(SdkError::Closed);
            }
        };
        let mut refused = Vec::new();
        for frame in &queue {
            match write_frame(&mut w, frame, ack.payload_bytes_max) {
                Ok(()) => {}
                Err(e @ SdkError::Local { .. }) => {
                    if let Frame::Request { id, .. } = frame {
                        refused.push((*id, e));
                    }
                }
                Err(e) => {
                    let _ = w.shutdown();
                    return Err(e);
                }
            }
        }
        *slot = WriterSlot::Open {
            w,
            payload_bytes_max: ack.payload_bytes_max,
        };
        drop(slot);
        let mut notify = false;
        {
            let mut st = self.lock();
            if !matches!(st.phase, Phase::Failed(_)) {
                st.phase = Phase::Open {
                    payload_bytes_max: ack.payload_bytes_max,
                    server: ack.server.clone(),
                };
            }
            notify |= st.wake(Key::Ready);
            for (id, e) in refused {
                if let Some(s) = st.streams.get_mut(&id) {
                    s.end = Some(Err(e));
                    notify |= st.wake(Key::Stream(id));
                }
            }
        }
        self.signal(notify);
        Ok(())
    }

    /// Ends the connection with `err` (the first error sticks): every open
    /// stream and ping gets it and every waiter is woken.
    pub(crate) fn fail_all(&self, err: SdkError) {
        let mut notify = false;
        {
            let mut st = self.lock();
            let err = match &st.phase {
                Phase::Failed(first) => first.clone(),
                _ => {
                    st.phase = Phase::Failed(err.clone());
                    err
                }
            };
            let mut keys = vec![Key::Ready];
            for (id, s) in st.streams.iter_mut() {
                if s.end.is_none() {
                    s.end = Some(Err(err.clone()));
                    keys.push(Key::Stream(*id));
                }
            }
            for (seq, p) in st.pings.iter_mut() {
                if p.result.is_none() {
                    p.result = Some(Err(err.clone()));
                    keys.push(Key::Ping(*seq));
                }
            }
            for k in keys {
                notify |= st.wake(k);
            }
        }
        self.signal(notify);
    }

    /// Wakes parked callers: the condvar when a blocking waiter was woken,
    /// the eventfd once while async keys are queued.
    pub(crate) fn signal(&self, notify: bool) {
        if notify {
            self.cond.notify_all();
        }
        let mut st = self.lock();
        if !st.ready.is_empty() && !st.wake_signalled {
            st.wake_signalled = true;
            drop(st);
            self.wake.signal();
        }
    }
}

fn check_prompt(prompt_bytes: usize, payload_bytes_max: u64) -> Result<(), SdkError> {
    let payload = (PARAMS_BYTES + prompt_bytes) as u64;
    if payload > payload_bytes_max {
        return Err(SdkError::Local {
            code: code::PAYLOAD_TOO_LARGE,
            message: format!(
                "a {prompt_bytes}-byte prompt makes a {payload}-byte REQUEST payload, over the server's limit of {payload_bytes_max}"
            ),
        });
    }
    Ok(())
}

/// Writes one frame; a REQUEST over the server's payload limit is refused
/// (`SdkError::Local`, nothing written): sent, it would be a violation that
/// closes the connection and every stream on it.
fn write_frame(w: &mut Writer, frame: &Frame, payload_bytes_max: u64) -> Result<(), SdkError> {
    let r = match frame {
        Frame::Request {
            id,
            credit,
            params,
            prompt,
        } => {
            check_prompt(prompt.len(), payload_bytes_max)?;
            w.request(*id, *credit, params, prompt)
        }
        Frame::Credit(id, n) => w.credit(*id, *n),
        Frame::Cancel(id) => w.cancel(*id),
        Frame::Ping(seq, stamp_ns) => w.ping(0, *seq, *stamp_ns, &[]),
    };
    r.map_err(|e| SdkError::Lost(e.to_string()))
}

/// A Linux eventfd: the reader thread signals it, the asyncio loop reads it.
pub(crate) struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    fn new() -> std::io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(EventFd {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own descriptor. A
        // failure (EAGAIN at the counter's maximum) leaves it readable,
        // which is all a signal needs.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from our own
        // non-blocking descriptor; EAGAIN (nothing signalled) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
}
