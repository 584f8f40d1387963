//! The session layer's own cost per request, without a kernel: one loop
//! turn of `Session` (frames in, the zero-delay synthetic backend, credit,
//! framing, one send per connection) driven through a transport that only
//! notes what it was asked to send. What it measures is the part of a
//! request's server time that is cnse-dp's code; `scripts/bench.sh`'s
//! inflight step measures the same shape with the kernel's TCP work added.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::synthetic::{SyntheticConfig, SyntheticFactory};
use cnse_backend::{BackendFactory, Params};
use cnse_proto::{put_hello, put_request, Direction, FrameDecoder, Kind, PAYLOAD_BYTES_MAX_DEFAULT};
use cnse_server::session::Session;
use cnse_server::transport::NoteIo;
use cnse_server::Config;
use divan::{counter::ItemsCount, Bencher};

/// The peers' protocol code (`benches/peer/session.rs`): what tokio,
/// tokio-uring and monoio wrap in their loops.
#[allow(dead_code)]
#[path = "../peer/session.rs"]
mod peer;

/// `conns` connections past their handshake, each of which sends the same
/// `inflight` REQUESTs (16 tokens, unlimited credit) every turn; every
/// stream ends within its turn, so the stream ids are free again. With
/// `http`, connections of the OpenAI front instead, each sending one
/// streaming `POST /v1/completions` of 16 tokens a turn (keep-alive).
struct Rig {
    session: Session<NoteIo>,
    conns: Vec<(u32, u32)>,
    requests: Vec<u8>,
    now: Instant,
}

/// `inflight` REQUESTs of 16 tokens (stream ids 1..=inflight, unlimited
/// credit), one connection's input of a turn.
fn binary_requests(inflight: usize) -> Vec<u8> {
    let params = Params {
        max_tokens: 16,
        ..Params::default()
    };
    let mut requests = Vec::new();
    for id in 1..=inflight as u64 {
        put_request(&mut requests, id, 0, &params, b"Write a haiku about the sea.");
    }
    requests
}

/// One streaming completion of 16 tokens, kept alive.
fn http_request() -> Vec<u8> {
    let body = br#"{"prompt":"Write a haiku about the sea.","max_tokens":16,"stream":true}"#;
    let mut r = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

impl Rig {
    fn new(conns: usize, inflight: usize) -> Rig {
        Rig::build(conns, inflight, false)
    }

    fn http(conns: usize) -> Rig {
        Rig::build(conns, 1, true)
    }

    fn build(conns: usize, inflight: usize, http: bool) -> Rig {
        let cfg = Arc::new(Config::default());
        let backend = SyntheticFactory::new(SyntheticConfig {
            ttft: Duration::ZERO,
            token_interval: Duration::ZERO,
            ..SyntheticConfig::default()
        })
        .build(0)
        .expect("the synthetic backend");
        let now = Instant::now();
        // Lengths only: the benchmark must not copy what it sends.
        let io = NoteIo::new(now, false);
        let mut session = Session::new(cfg, backend, io, now, conns.next_power_of_two(), 0);
        let requests = if http {
            http_request()
        } else {
            binary_requests(inflight)
        };
        let mut hello = Vec::new();
        put_hello(&mut hello, b"");
        session.begin_turn(now);
        let conns = (0..conns)
            .map(|i| {
                let fd = 1000 + i as RawFd;
                if http {
                    return (session.on_accept_http(fd).expect("a free connection slot"), 0);
                }
                let slot = session.on_accept(fd).expect("a free connection slot");
                session.on_input(slot, 0, &hello);
                (slot, 0)
            })
            .collect();
        session.end_turn();
        let mut rig = Rig {
            session,
            conns,
            requests,
            now,
        };
        rig.turn(false);
        rig
    }

    /// One loop turn: last turn's sends complete, every connection's
    /// requests arrive, then the backend, the flush and the sends.
    fn turn(&mut self, with_requests: bool) {
        self.now += Duration::from_micros(10);
        self.session.io_mut().now = self.now;
        self.session.begin_turn(self.now);
        let mut sends = std::mem::take(&mut self.session.io_mut().sends);
        for sent in &sends {
            self.session
                .on_send_done(sent.conn.slot, sent.conn.gen, sent.len as i32);
        }
        sends.clear();
        // The buffer goes back (capacity kept); what this turn queued meanwhile
        // is none: completions only mark connections dirty.
        debug_assert!(self.session.io_mut().sends.is_empty());
        self.session.io_mut().sends = sends;
        if with_requests {
            for &(slot, gen) in &self.conns {
                self.session.on_input(slot, gen, &self.requests);
            }
        }
        self.session.end_turn();
    }
}

/// Requests per turn: `conns` × `inflight`, each of 16 tokens.
#[divan::bench(args = [(64, 4), (64, 64), (256, 1)])]
fn session_turn(b: Bencher, (conns, inflight): (usize, usize)) {
    measure(b, Rig::new(conns, inflight), conns * inflight);
}

/// The same turn through the peers' protocol code (one `peer::Session`
/// per connection, replies appended to one buffer per connection, which
/// the "send" empties): the user-space part of a peer's request, side by
/// side with `session_turn`'s.
#[divan::bench(args = [(64, 4), (64, 64), (256, 1)])]
fn peer_session_turn(b: Bencher, (conns, inflight): (usize, usize)) {
    let requests = binary_requests(inflight);
    let mut hello = Vec::new();
    put_hello(&mut hello, b"");
    let now = Instant::now();
    let mut sessions: Vec<(peer::Session, Vec<u8>)> = (0..conns)
        .map(|_| {
            let mut s = peer::Session::new("peer");
            let mut out = Vec::with_capacity(64 * 1024);
            assert_eq!(s.on_input(&hello, now, &mut out), peer::Verdict::Open);
            (s, out)
        })
        .collect();
    let turn = |sessions: &mut Vec<(peer::Session, Vec<u8>)>| {
        let mut bytes = 0;
        for (s, out) in sessions.iter_mut() {
            out.clear();
            assert_eq!(s.on_input(&requests, now, out), peer::Verdict::Open);
            bytes += out.len();
        }
        bytes
    };
    turn(&mut sessions);
    for (_, out) in &sessions {
        assert_eq!(
            answered(out),
            (16 * inflight as u64, inflight),
            "every request answered in the turn"
        );
    }
    b.counter(ItemsCount::new(conns * inflight))
        .bench_local(|| turn(&mut sessions));
}

/// (tokens, ENDs) in a connection's replies.
fn answered(mut out: &[u8]) -> (u64, usize) {
    let mut decoder = FrameDecoder::new(Direction::ToClient, PAYLOAD_BYTES_MAX_DEFAULT);
    let (mut tokens, mut ends) = (0, 0);
    while let Some(f) = decoder.next(&mut out).expect("well-formed replies") {
        match f.kind {
            Kind::Tokens => tokens += u64::from(f.header.arg()),
            Kind::End => ends += 1,
            k => panic!("unexpected {k:?}"),
        }
    }
    (tokens, ends)
}

/// The OpenAI front: one streaming completion of 16 tokens per connection
/// and turn (server-sent events, chunked).
#[divan::bench(args = [64, 256])]
fn session_turn_http(b: Bencher, conns: usize) {
    measure(b, Rig::http(conns), conns);
}

/// Checks that a turn serves all `per_turn` requests, then times turns.
fn measure(b: Bencher, mut rig: Rig, per_turn: usize) {
    rig.turn(true);
    let before = rig.session.counters();
    rig.turn(true);
    let after = rig.session.counters();
    let n = per_turn as u64;
    assert_eq!(after.requests - before.requests, n, "every request taken in one turn");
    assert_eq!(after.tokens_sent - before.tokens_sent, 16 * n, "and answered in it");
    assert_eq!(after.streams_open, 0, "every stream ended");
    b.counter(ItemsCount::new(per_turn)).bench_local(|| rig.turn(true));
}
