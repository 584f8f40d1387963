//! The reader thread of a connection: connects and does the handshake
//! (`cnse_client::Client::connect_hello`), then owns the receiving half.
//! Each wake-up it takes one frame, then every frame already whole in the
//! buffer, under one lock; then it sends the CREDIT/CANCEL frames that
//! produced, wakes the callers of that batch at once, and every [`TICK`]
//! fails waiters that saw nothing for the configured timeout. When the
//! connection ends, for whatever reason (the thread also catches its own
//! panics), every stream and ping still open gets the error.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_client::{Client, ClientError, OwnedFrame};
use cnse_proto::{end_times, Kind};

use crate::core::{grant_step, Config, Core, EndFacts, Frame, Key, State, Waiter};
use crate::error::SdkError;

/// Read timeout of the reader: how often timeouts are checked when the
/// connection is quiet.
pub const TICK: Duration = Duration::from_millis(100);

/// Starts a connection: the reader thread connects in the background;
/// frames sent meanwhile are queued.
pub fn start(cfg: Config) -> Result<Arc<Core>, SdkError> {
    let core = Arc::new(Core::new(cfg)?);
    let c = core.clone();
    std::thread::Builder::new()
        .name("cnse-reader".into())
        .spawn(move || run(&c))
        .map_err(|e| SdkError::Connect(format!("starting the reader thread: {e}")))?;
    Ok(core)
}

fn run(core: &Core) {
    let why = match std::panic::catch_unwind(AssertUnwindSafe(|| serve(core))) {
        Ok(why) => why,
        Err(_) => SdkError::Lost("the connection's reader thread panicked".into()),
    };
    core.shut(why);
}

/// What one batch of frames leaves to do after the lock is released.
struct Batch {
    out: Vec<Frame>,
    notify: bool,
}

/// Reads until the connection ends; returns why it ended.
fn serve(core: &Core) -> SdkError {
    let cfg = &core.cfg;
    // Failover marks are asked for: `Completion.failed_over` shows them.
    let hello = Client::connect(cfg.addr.as_str(), cfg.connect_timeout).and_then(|mut c| {
        let ack = c.hello_features(&cfg.auth_key, cnse_proto::FEATURE_FAILOVER_MARK)?;
        Ok((c, ack))
    });
    let (mut client, ack) = match hello {
        Ok(c) => c,
        Err(e) => return SdkError::from_client(e, true),
    };
    let writer = match client.writer() {
        Ok(w) => w,
        Err(e) => return SdkError::from_client(e, true),
    };
    // Read and write timeouts are one socket's options: reads wake every
    // tick, writes keep the connect timeout.
    if let Err(e) = client
        .set_timeout(TICK)
        .and_then(|()| writer.set_write_timeout(cfg.connect_timeout))
    {
        return SdkError::from_client(e, true);
    }
    if let Err(e) = core.open(writer, &ack) {
        return e;
    }
    let mut batch = Batch {
        out: Vec::new(),
        notify: false,
    };
    let mut last_check = Instant::now();
    loop {
        let first = match client.next_frame() {
            Ok(f) => Some(f),
            Err(ClientError::Timeout { .. }) => None,
            Err(e) => {
                return core
                    .lock()
                    .conn_error
                    .clone()
                    .unwrap_or(SdkError::from_client(e, false))
            }
        };
        if let Some(mut f) = first {
            let mut st = core.lock();
            let now = Instant::now();
            loop {
                if let Err(e) = dispatch(&mut st, f, now, &mut batch) {
                    return e;
                }
                match client.buffered_frame() {
                    Ok(Some(next)) => f = next,
                    Ok(None) => break,
                    Err(e) => return SdkError::from_client(e, false),
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_check) >= TICK {
            last_check = now;
            check_deadlines(&mut core.lock(), cfg, now, &mut batch);
        }
        for f in batch.out.drain(..) {
            // A failed send fails the connection; the next read sees it.
            let _ = core.send(f);
        }
        core.signal(std::mem::take(&mut batch.notify));
    }
}

/// Applies one frame to the tables. An error ends the connection.
fn dispatch(st: &mut State, f: OwnedFrame, now: Instant, batch: &mut Batch) -> Result<(), SdkError> {
    match f.kind {
        Kind::Tokens => on_tokens(st, &f, now, batch),
        Kind::End => on_end(st, &f, batch),
        Kind::Error if f.stream_id == 0 => {
            st.conn_error = Some(SdkError::Server {
                code: f.arg,
                stream_id: 0,
                message: f.text(),
            });
        }
        Kind::Error => {
            if let Some(s) = st.streams.get_mut(&f.stream_id).filter(|s| s.end.is_none()) {
                s.end = Some(Err(SdkError::Server {
                    code: f.arg,
                    stream_id: f.stream_id,
                    message: f.text(),
                }));
                batch.notify |= st.wake(Key::Stream(f.stream_id));
            }
        }
        Kind::Pong => {
            if let Some(p) = st
                .pings
                .get_mut(&f.arg)
                .filter(|p| f.stream_id == 0 && p.result.is_none())
            {
                p.result = Some(Ok(now.saturating_duration_since(p.sent)));
                batch.notify |= st.wake(Key::Ping(f.arg));
            }
        }
        other => {
            return Err(SdkError::Protocol(format!(
                "server sent {other:?} on stream {} after the handshake",
                f.stream_id
            )))
        }
    }
    Ok(())
}

fn on_tokens(st: &mut State, f: &OwnedFrame, now: Instant, batch: &mut Batch) {
    let id = f.stream_id;
    // Frames of a released stream, or of one that already failed here
    // (timeout, bad frame), are dropped.
    let Some(s) = st.streams.get_mut(&id).filter(|s| s.end.is_none()) else {
        return;
    };
    let n = f.arg;
    let problem = if f.aux != s.tokens {
        Some(format!("TOKENS at index {} after {} tokens", f.aux, s.tokens))
    } else if n == 0 {
        Some("TOKENS with a count of 0".to_string())
    } else if s.tokens + u64::from(n) > s.granted {
        Some(format!(
            "{} tokens where {} were granted",
            s.tokens + u64::from(n),
            s.granted
        ))
    } else {
        None
    };
    if let Some(p) = problem {
        s.end = Some(Err(SdkError::Protocol(format!("stream {id}: {p}"))));
        if !s.cancel_sent {
            s.cancel_sent = true;
            batch.out.push(Frame::Cancel(id));
        }
        batch.notify |= st.wake(Key::Stream(id));
        return;
    }
    s.tokens += u64::from(n);
    let start = s.full.len();
    s.utf8.push(&f.payload, &mut s.full);
    if s.collect {
        // Taken on arrival: credit goes straight back.
        s.ungranted += n;
        if s.ungranted >= grant_step(s.window) {
            batch.out.push(Frame::Credit(id, s.ungranted));
            s.granted += u64::from(s.ungranted);
            s.ungranted = 0;
        }
        if s.waiter != Waiter::None {
            s.waiting_since = Some(now);
        }
        return;
    }
    s.text.push_str(&s.full[start..]);
    s.pending_tokens += n;
    batch.notify |= st.wake(Key::Stream(id));
}

fn on_end(st: &mut State, f: &OwnedFrame, batch: &mut Batch) {
    let id = f.stream_id;
    let Some(s) = st.streams.get_mut(&id).filter(|s| s.end.is_none()) else {
        return;
    };
    let start = s.full.len();
    s.utf8.finish(&mut s.full);
    if !s.collect {
        s.text.push_str(&s.full[start..]);
    }
    s.end = Some(match end_times(&f.payload) {
        Some((ttft_us, total_us)) => Ok(EndFacts {
            reason: f.arg,
            tokens: f.aux,
            ttft_us,
            total_us,
            failed_over: f.flags & cnse_proto::END_FLAG_FAILED_OVER != 0,
        }),
        None => Err(SdkError::Protocol(format!(
            "stream {id}: END with a {}-byte payload",
            f.payload.len()
        ))),
    });
    batch.notify |= st.wake(Key::Stream(id));
}

/// Fails streams and pings whose waiter has seen nothing for the timeout;
/// a timed-out stream is cancelled at the server.
fn check_deadlines(st: &mut State, cfg: &Config, now: Instant, batch: &mut Batch) {
    let Some(timeout) = cfg.timeout else { return };
    let expired = |since: Option<Instant>| since.is_some_and(|t| now.saturating_duration_since(t) >= timeout);
    let mut keys = Vec::new();
    for (&id, s) in st.streams.iter_mut() {
        if s.end.is_none() && s.waiter != Waiter::None && expired(s.waiting_since) {
            s.end = Some(Err(SdkError::Timeout(format!(
                "stream {id}: nothing from {} for {:.1} s",
                cfg.addr,
                timeout.as_secs_f64()
            ))));
            if !s.cancel_sent {
                s.cancel_sent = true;
                batch.out.push(Frame::Cancel(id));
            }
            keys.push(Key::Stream(id));
        }
    }
    for (&seq, p) in st.pings.iter_mut() {
        if p.result.is_none() && p.waiter != Waiter::None && expired(p.waiting_since) {
            p.result = Some(Err(SdkError::Timeout(format!(
                "no PONG from {} within {:.1} s",
                cfg.addr,
                timeout.as_secs_f64()
            ))));
            keys.push(Key::Ping(seq));
        }
    }
    for k in keys {
        batch.notify |= st.wake(k);
    }
}
