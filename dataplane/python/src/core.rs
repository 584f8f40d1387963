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
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cnse_client::{HelloAck, Writer};
use cnse_proto::{code, Params, PARAMS_BYTES};

use crate::error::SdkError;
use crate::eventfd::EventFd;
use crate::table::Phase;
pub(crate) use crate::table::{grant_step, PingState, State, StreamState};
pub use crate::table::{EndFacts, Frame, Key, Polled, Value, Waiter};
use crate::utf8::Utf8Carry;

/// Streams tracked per connection (open, or ended and not yet released).
pub const STREAMS_MAX: usize = 4096;
/// Pings in flight per connection.
pub const PINGS_MAX: usize = 1024;
/// Largest credit window (tokens); the server buffers far fewer per stream.
pub const WINDOW_MAX: u32 = 65_536;
/// Frames queued while the handshake is under way.
pub const PENDING_FRAMES_MAX: usize = STREAMS_MAX + PINGS_MAX;

#[derive(Clone)]
pub struct Config {
    pub addr: String,
    /// Never printed (`Debug` redacts it).
    pub auth_key: Vec<u8>,
    /// How long a waiting stream or ping may see nothing; `None`: forever.
    pub timeout: Option<Duration>,
    /// Bounds connecting, the handshake and every write.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field(
                "auth_key",
                &if self.auth_key.is_empty() { "none" } else { "<redacted>" },
            )
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic never happens under these locks; if one did, the data is
    // still consistent enough to fail the connection cleanly.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        self.wake.fd()
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
    /// `session`: a session key the REQUEST carries (docs/PROTOCOL.md,
    /// "Session keys").
    pub fn open_stream(
        &self,
        params: Params,
        prompt: String,
        session: Option<String>,
        window: u32,
        collect: bool,
    ) -> Result<u64, SdkError> {
        if window == 0 || window > WINDOW_MAX {
            return Err(SdkError::Usage(format!(
                "window must be 1..={WINDOW_MAX} tokens, got {window}"
            )));
        }
        if session.as_ref().is_some_and(|k| !cnse_proto::session_key_valid(k.as_bytes())) {
            return Err(SdkError::Usage(
                "session must be 1-256 visible ASCII characters (0x21-0x7e)".into(),
            ));
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
            session,
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
            session,
        } => match session {
            Some(key) => {
                // The key and its u16 length travel in the payload too.
                check_prompt(prompt.len() + 2 + key.len(), payload_bytes_max)?;
                w.request_with_session(*id, *credit, params, key.as_bytes(), prompt)
            }
            None => {
                check_prompt(prompt.len(), payload_bytes_max)?;
                w.request(*id, *credit, params, prompt)
            }
        },
        Frame::Credit(id, n) => w.credit(*id, *n),
        Frame::Cancel(id) => w.cancel(*id),
        Frame::Ping(seq, stamp_ns) => w.ping(0, *seq, *stamp_ns, &[]),
    };
    r.map_err(|e| SdkError::Lost(e.to_string()))
}
