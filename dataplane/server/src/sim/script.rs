//! The session driven by arbitrary bytes (the `session` fuzz target): the
//! input is a script of kernel events and of bytes that clients send, any
//! bytes at all, cut at any point. Where `run` plays protocol-aware
//! clients from a seed, this lets a fuzzer write the clients.
//!
//! Checked after every event: the session's own invariants
//! (`check_session`); everything the server sends is a well-formed stream
//! of server frames; HELLO_ACK goes only to a client whose first frame was
//! a HELLO with the key (when one is configured); TOKENS and END only on
//! stream ids the client opened with a REQUEST; no request reaches the
//! backend while no client has authenticated. At the end every client goes
//! away (or the server shuts down) and every slot, buffer and socket must
//! be back.
//!
//! Script: byte 0 sets the configuration (bit 0: a key; bit 1: shut down at
//! the end; bit 2: a small memory budget); then events, each one byte
//! `op | client << 3` and its operands (see [`Script::event`]).

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::synthetic::{SyntheticConfig, SyntheticFactory};
use cnse_backend::BackendFactory;
use cnse_proto::{Direction, FrameDecoder, Kind};

use super::io::SimIo;
use super::{check_session, quiescent};
use crate::session::Session;
use crate::Config;

/// The key a script's clients must offer when bit 0 of its first byte is
/// set.
pub const SCRIPT_KEY: &[u8] = b"fuzz-key";
/// Clients a script can drive (more than the connection slots, so a full
/// table is reached).
pub const SCRIPT_CLIENTS: usize = 4;
const CONNS_MAX: usize = 3;
const PAYLOAD_BYTES_MAX: u32 = 4096;
/// Largest server frame a client accepts: a TOKENS batch of the small
/// stream bounds below fits easily.
const SERVER_FRAME_BYTES_MAX: u32 = 1 << 20;
/// Turns allowed for the final drain.
const DRAIN_TURNS_MAX: u32 = 2_000;

/// What a script did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScriptReport {
    pub events: u64,
    pub connections: u64,
    pub requests: u64,
    pub frames_to_clients: u64,
    pub violations: u64,
}

/// A client as the fuzzer writes it, and what it has seen.
struct Peer {
    fd: Option<RawFd>,
    /// Bytes sent and not yet received by the server.
    out: Vec<u8>,
    /// Its own bytes as the server will decode them.
    sent: FrameDecoder,
    sent_broken: bool,
    frames_sent: u64,
    /// Its first frame was a HELLO with the key (or no key is configured).
    authorized: bool,
    requested: BTreeSet<u64>,
    /// What the server sent it.
    received: FrameDecoder,
}

impl Peer {
    fn new() -> Peer {
        Peer {
            fd: None,
            out: Vec::new(),
            sent: FrameDecoder::new(Direction::ToServer, PAYLOAD_BYTES_MAX),
            sent_broken: false,
            frames_sent: 0,
            authorized: false,
            requested: BTreeSet::new(),
            received: FrameDecoder::new(Direction::ToClient, SERVER_FRAME_BYTES_MAX),
        }
    }

    /// Notes what the server will make of `bytes` (it decodes the same way).
    fn note_sent(&mut self, mut bytes: &[u8], key: Option<&[u8]>) {
        while !self.sent_broken {
            match self.sent.next(&mut bytes) {
                Ok(Some(f)) => {
                    if self.frames_sent == 0 && f.kind == Kind::Hello {
                        self.authorized = key.is_none_or(|k| f.payload == k);
                    }
                    if f.kind == Kind::Request {
                        self.requested.insert(f.header.stream_id());
                    }
                    self.frames_sent += 1;
                }
                Ok(None) => break,
                Err(_) => self.sent_broken = true,
            }
        }
    }

    /// Checks what the server sent.
    fn note_received(&mut self, mut bytes: &[u8]) -> Result<u64, String> {
        let mut frames = 0;
        loop {
            let f = match self.received.next(&mut bytes) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(frames),
                Err(v) => return Err(format!("the server sent a malformed frame: {v}")),
            };
            frames += 1;
            let id = f.header.stream_id();
            match f.kind {
                Kind::HelloAck if !self.authorized => {
                    return Err("HELLO_ACK to a client that did not authenticate".into())
                }
                Kind::Tokens | Kind::End if !self.authorized || !self.requested.contains(&id) => {
                    return Err(format!("{:?} on stream {id}, which the client never opened", f.kind));
                }
                _ => {}
            }
        }
    }
}

struct Script<'a> {
    input: &'a [u8],
    session: Session<SimIo>,
    peers: Vec<Peer>,
    key: Option<Vec<u8>>,
    base: Instant,
    clock: Duration,
    /// Some client, at some point, opened with a HELLO with the key.
    authenticated: bool,
    report: ScriptReport,
}

fn config(flags: u8) -> Config {
    Config {
        payload_bytes_max: PAYLOAD_BYTES_MAX,
        max_tokens_limit: 32,
        conns_per_thread_max: CONNS_MAX,
        streams_per_conn_max: 3,
        streams_per_thread_max: 6,
        stream_buffered_tokens_max: 4,
        stream_buffered_bytes_max: 256,
        admission_queue_max: 4,
        send_buffer_bytes: 512,
        handshake_timeout: Duration::from_millis(200),
        idle_timeout: Duration::from_millis(2_000),
        shutdown_grace: Duration::from_millis(100),
        stream_stall_timeout: Duration::from_millis(500),
        memory_budget_bytes: if flags & 4 != 0 { 6_000 } else { 1 << 30 },
        auth_key: (flags & 1 != 0).then(|| crate::Secret::new(SCRIPT_KEY.to_vec())),
        ..Config::default()
    }
}

/// Runs one script; the first broken invariant ends it.
pub fn run_script(input: &[u8]) -> Result<ScriptReport, String> {
    let Some((&flags, input)) = input.split_first() else {
        return Ok(ScriptReport::default());
    };
    let cfg = config(flags);
    let key = cfg.auth_key.as_ref().map(|k| k.expose().to_vec());
    let backend = SyntheticFactory::new(SyntheticConfig {
        ttft: Duration::from_micros(300),
        token_interval: Duration::from_micros(100),
        active_max: 2,
        ..SyntheticConfig::default()
    })
    .build(0)?;
    let base = Instant::now();
    let session = Session::new(Arc::new(cfg), backend, SimIo::new(base), base, CONNS_MAX, 0);
    let mut s = Script {
        input,
        session,
        peers: (0..SCRIPT_CLIENTS).map(|_| Peer::new()).collect(),
        key: key.clone(),
        base,
        clock: Duration::ZERO,
        authenticated: key.is_none(),
        report: ScriptReport::default(),
    };
    while let Some(b) = s.byte() {
        s.begin();
        s.event(b)?;
        s.settle_closed()?;
        s.check()?;
        s.report.events += 1;
    }
    s.finish(flags & 2 != 0)?;
    let n = s.session.counters();
    s.report.requests = n.requests;
    s.report.violations = n.violations;
    Ok(s.report)
}

impl Script<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.input.split_first()?;
        self.input = rest;
        Some(b)
    }

    fn begin(&mut self) {
        let now = self.base + self.clock;
        self.session.io.now = now;
        self.session.begin_turn(now);
    }

    /// One event: `op` (low 3 bits) by client `b >> 3` (mod the clients).
    fn event(&mut self, b: u8) -> Result<(), String> {
        let who = usize::from(b >> 3) % SCRIPT_CLIENTS;
        match b & 7 {
            // Connect (a connected client stays as it is).
            0 if self.peers[who].fd.is_none() => {
                let fd = self.session.io.connect(who);
                self.peers[who] = Peer::new();
                self.peers[who].fd = Some(fd);
                self.report.connections += 1;
                self.session.on_accept(fd);
            }
            // Send the next 1 + n bytes of the script.
            1 => {
                let n = usize::from(self.byte().unwrap_or(0)) + 1;
                let (bytes, rest) = self.input.split_at(n.min(self.input.len()));
                self.input = rest;
                if self.peers[who].fd.is_some() {
                    let key = self.key.clone();
                    self.peers[who].out.extend_from_slice(bytes);
                    self.peers[who].note_sent(bytes, key.as_deref());
                    self.authenticated |= self.peers[who].authorized;
                }
            }
            // Up to 1 + n of its bytes reach an armed receive (255: all).
            2 => {
                let n = self.byte().unwrap_or(255);
                self.deliver(who, if n == 255 { usize::MAX } else { usize::from(n) + 1 });
            }
            // Its pending send completes: n of 0..=127 short, else whole.
            3 => {
                let n = self.byte().unwrap_or(255);
                self.complete_send(who, n)?;
            }
            // Its receive ends without data (ENOBUFS, or the cancel asked).
            4 => self.end_recv(who, None),
            // It goes away: EOF or reset.
            5 => self.gone(who, b & 0x80 != 0),
            // Time passes: n² ms (up to 65 s, across every timeout).
            6 => {
                let n = u64::from(self.byte().unwrap_or(0));
                self.clock += Duration::from_millis(n * n) + Duration::from_micros(50);
            }
            _ => self.session.end_turn(),
        }
        Ok(())
    }

    fn deliver(&mut self, who: usize, max: usize) {
        let Some(fd) = self.peers[who].fd else { return };
        let s = &self.session.io.sockets[&fd];
        let Some(r) = s.recv.as_ref().filter(|r| !r.cancel_requested && !s.shut && !s.closed) else {
            return;
        };
        let conn = r.conn;
        let out = &mut self.peers[who].out;
        if out.is_empty() {
            return;
        }
        let chunk: Vec<u8> = out.drain(..max.min(out.len())).collect();
        self.session.on_input(conn.slot, conn.gen, &chunk);
        self.session.on_recv_done(conn.slot, conn.gen, 1, true);
    }

    fn complete_send(&mut self, who: usize, n: u8) -> Result<(), String> {
        let Some(fd) = self.peers[who].fd else { return Ok(()) };
        let Some(op) = self.session.io.sockets.get_mut(&fd).and_then(|s| s.send.take()) else {
            return Ok(());
        };
        let len = op.bytes.len();
        let done = if n < 128 {
            (len * usize::from(n) / 128).max(1)
        } else {
            len
        };
        self.report.frames_to_clients += self.peers[who].note_received(&op.bytes[..done])?;
        self.session.on_send_done(op.conn.slot, op.conn.gen, done as i32);
        Ok(())
    }

    fn end_recv(&mut self, who: usize, result: Option<i32>) {
        let Some(fd) = self.peers[who].fd else { return };
        let Some(r) = self.session.io.sockets.get_mut(&fd).and_then(|s| s.recv.take()) else {
            return;
        };
        let result = result.unwrap_or(if r.cancel_requested {
            -libc::ECANCELED
        } else {
            -libc::ENOBUFS
        });
        self.session.on_recv_done(r.conn.slot, r.conn.gen, result, false);
    }

    fn gone(&mut self, who: usize, reset: bool) {
        if self.peers[who].fd.is_none() {
            return;
        }
        self.end_recv(who, Some(if reset { -libc::ECONNRESET } else { 0 }));
        self.fail_send(who);
        self.peers[who].fd = None;
    }

    fn fail_send(&mut self, who: usize) {
        let Some(fd) = self.peers[who].fd else { return };
        if let Some(op) = self.session.io.sockets.get_mut(&fd).and_then(|s| s.send.take()) {
            self.session.on_send_done(op.conn.slot, op.conn.gen, -libc::EPIPE);
        }
    }

    /// Sockets the session shut or closed: their ops complete as the
    /// kernel completes them, and a closed one's client is gone.
    fn settle_closed(&mut self) -> Result<(), String> {
        for who in 0..SCRIPT_CLIENTS {
            let Some(fd) = self.peers[who].fd else { continue };
            let s = &self.session.io.sockets[&fd];
            if s.closed {
                self.peers[who].fd = None;
            } else if s.shut {
                // What was sent before the shutdown still reaches the client.
                if let Some(op) = self.session.io.sockets.get_mut(&fd).and_then(|s| s.send.take()) {
                    self.report.frames_to_clients += self.peers[who].note_received(&op.bytes)?;
                    self.session
                        .on_send_done(op.conn.slot, op.conn.gen, op.bytes.len() as i32);
                }
                self.end_recv(who, Some(0));
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        check_session(&self.session, CONNS_MAX)?;
        let n = self.session.counters();
        if !self.authenticated && (n.requests > 0 || self.session.backend_active() > 0) {
            return Err(format!(
                "{} requests, {} backend works, and no client authenticated",
                n.requests,
                self.session.backend_active()
            ));
        }
        Ok(())
    }

    /// Every client reads what is left and goes (or the server shuts down
    /// first); then everything must come back.
    fn finish(&mut self, shutdown: bool) -> Result<(), String> {
        if shutdown {
            for _ in 0..DRAIN_TURNS_MAX {
                self.begin();
                if self.session.shutdown_step(true) {
                    break;
                }
                for who in 0..SCRIPT_CLIENTS {
                    self.deliver(who, usize::MAX);
                    self.complete_send(who, 255)?;
                }
                self.session.end_turn();
                self.settle_closed()?;
                self.check()?;
                self.clock += Duration::from_millis(5);
            }
        }
        for who in 0..SCRIPT_CLIENTS {
            self.gone(who, false);
        }
        for _ in 0..DRAIN_TURNS_MAX {
            self.clock += Duration::from_millis(50);
            self.begin();
            self.session.end_turn();
            self.drain_gone();
            self.check()?;
            if quiescent(&self.session, CONNS_MAX) {
                return Ok(());
            }
        }
        Err("not everything came back after every client left".into())
    }

    /// Ops of sockets whose client left complete as EOF and EPIPE.
    fn drain_gone(&mut self) {
        let fds: Vec<RawFd> = self.session.io.sockets.keys().copied().collect();
        for fd in fds {
            let s = self.session.io.sockets.get_mut(&fd).expect("listed");
            if s.closed {
                continue;
            }
            if let Some(r) = s.recv.take() {
                self.session.on_recv_done(r.conn.slot, r.conn.gen, 0, false);
            }
            if let Some(op) = self.session.io.sockets.get_mut(&fd).and_then(|s| s.send.take()) {
                self.session.on_send_done(op.conn.slot, op.conn.gen, -libc::EPIPE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnse_proto::{put_hello, put_request, Params};

    /// A script: `flags`, then client 0 connects, sends `bytes` in one
    /// piece, and the bytes and the answers flow for a while.
    fn script(flags: u8, bytes: &[u8]) -> Vec<u8> {
        let mut s = vec![flags, 0];
        for piece in bytes.chunks(256) {
            s.extend_from_slice(&[1, (piece.len() - 1) as u8]);
            s.extend_from_slice(piece);
        }
        for _ in 0..40 {
            s.extend_from_slice(&[2, 255, 7, 6, 3, 3, 255]);
        }
        s
    }

    fn hello_request(key: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        put_hello(&mut b, key);
        let p = Params {
            max_tokens: 4,
            ..Params::default()
        };
        put_request(&mut b, 1, 100, &p, b"hi");
        b
    }

    #[test]
    fn a_good_client_streams() {
        let r = run_script(&script(0, &hello_request(b""))).unwrap();
        assert_eq!(r.requests, 1);
        // HELLO_ACK, then TOKENS and the END.
        assert!(r.frames_to_clients >= 3, "{r:?}");
    }

    #[test]
    fn issue11_wrong_key_reaches_no_backend() {
        let r = run_script(&script(1, &hello_request(b"not-the-key"))).unwrap();
        assert_eq!((r.requests, r.violations), (0, 1), "{r:?}");
        let r = run_script(&script(1, &hello_request(SCRIPT_KEY))).unwrap();
        assert_eq!(r.requests, 1, "{r:?}");
    }

    #[test]
    fn garbage_and_empty_scripts_pass() {
        assert!(run_script(&[]).is_ok());
        for seed in 0..200u32 {
            let bytes: Vec<u8> = (0..400u32)
                .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed.wrapping_mul(40_503)) >> 13) as u8)
                .collect();
            run_script(&bytes).unwrap();
        }
    }
}
