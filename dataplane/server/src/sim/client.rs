//! Simulated clients: each one does random things its behaviour allows and
//! checks every frame the server sends it against the protocol: one
//! HELLO_ACK, TOKENS only on open streams with consecutive indices and
//! within credit, END's count equal to the tokens received, and each
//! stream ended at most once.

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use cnse_proto::{
    code, put_cancel, put_credit, put_hello, put_ping, put_request, Direction, FrameDecoder, Kind, Params,
};

use super::rng::Rng;

/// What a client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    /// Valid traffic; reads everything; grants credit.
    Good,
    /// Valid traffic, never reads.
    NoRead,
    /// HELLO with a wrong key.
    BadAuth,
    /// Valid traffic, then random bytes.
    Garbage,
    /// Valid-but-hostile frames: bad parameters, duplicate ids, stream 0.
    Hostile,
    /// Connects and sends nothing.
    Silent,
    /// Small initial credit, never grants more.
    Stingy,
}

const BEHAVIORS: [Behavior; 9] = [
    Behavior::Good,
    Behavior::Good,
    Behavior::Good,
    Behavior::NoRead,
    Behavior::BadAuth,
    Behavior::Garbage,
    Behavior::Hostile,
    Behavior::Silent,
    Behavior::Stingy,
];

/// Bytes a client keeps queued for the server at most (it stops producing
/// while the server does not read).
const OUT_MAX_BYTES: usize = 8 * 1024;

#[derive(Debug, Default)]
pub struct ClientStream {
    /// Tokens allowed so far; `None` for unlimited credit.
    pub credit: Option<u64>,
    pub received: u64,
    pub ended: bool,
    /// Duplicate REQUESTs sent on this id (each gets ERROR 409).
    pub duplicates: u32,
}

pub struct Client {
    pub behavior: Behavior,
    pub fd: Option<RawFd>,
    /// Still connected from the client's side.
    pub connected: bool,
    /// Bytes queued for the server.
    pub out: Vec<u8>,
    decoder: FrameDecoder,
    pub streams: BTreeMap<u64, ClientStream>,
    next_stream: u64,
    hello_sent: bool,
    pub acked: bool,
    /// ERROR on stream 0 received: the server is closing the connection.
    pub conn_error: Option<u32>,
    /// Protocol failures this client saw.
    pub failures: Vec<String>,
    pub tokens: u64,
    pub ends: u64,
    pub errors: u64,
}

impl Client {
    pub fn new(rng: &mut Rng, payload_bytes_max: u32) -> Client {
        Client {
            behavior: *rng.pick(&BEHAVIORS),
            fd: None,
            connected: false,
            out: Vec::new(),
            decoder: FrameDecoder::new(Direction::ToClient, payload_bytes_max.max(1 << 20)),
            streams: BTreeMap::new(),
            next_stream: 1,
            hello_sent: false,
            acked: false,
            conn_error: None,
            failures: Vec::new(),
            tokens: 0,
            ends: 0,
            errors: 0,
        }
    }

    pub fn reads(&self) -> bool {
        self.behavior != Behavior::NoRead
    }

    /// Streams opened and not ended.
    pub fn open_streams(&self) -> impl Iterator<Item = (&u64, &ClientStream)> {
        self.streams.iter().filter(|(_, s)| !s.ended)
    }

    /// Does one random thing; `draining` clients open no new streams.
    pub fn act(&mut self, rng: &mut Rng, key: Option<&[u8]>, draining: bool) {
        if !self.connected || self.out.len() > OUT_MAX_BYTES || self.behavior == Behavior::Silent {
            return;
        }
        if !self.hello_sent {
            self.hello_sent = true;
            let token: &[u8] = match (self.behavior, key) {
                (Behavior::BadAuth, Some(_)) => b"not-the-key",
                (Behavior::BadAuth, None) => return put_request(&mut self.out, 1, 0, &Params::default(), b"x"),
                (_, Some(k)) => k,
                (_, None) => b"",
            };
            return put_hello(&mut self.out, token);
        }
        match rng.below(10) {
            0..=3 if !draining => self.request(rng),
            4 if !draining && self.behavior == Behavior::Hostile => self.hostile(rng),
            4 if !draining && self.behavior == Behavior::Garbage => {
                let n = rng.range(1, 64) as usize;
                self.out.extend((0..n).map(|_| rng.next_u64() as u8));
            }
            5 | 6 => self.grant(rng),
            7 if rng.chance(30) => self.cancel_one(rng),
            8 => put_ping(&mut self.out, rng.below(4), 7, 9, b"sim"),
            _ => {}
        }
    }

    fn request(&mut self, rng: &mut Rng) {
        let id = self.next_stream;
        self.next_stream += 1;
        let params = Params {
            max_tokens: rng.range(1, 24) as u32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: rng.below(1000),
            priority: rng.below(3) as u32,
        };
        let initial = match self.behavior {
            Behavior::Stingy => rng.range(1, 2) as u32,
            _ if rng.chance(40) => rng.range(1, 4) as u32,
            _ => 0,
        };
        let prompt = vec![b'p'; rng.range(1, 12_000) as usize];
        put_request(&mut self.out, id, initial, &params, &prompt);
        self.streams.insert(
            id,
            ClientStream {
                credit: (initial > 0).then_some(u64::from(initial)),
                ..ClientStream::default()
            },
        );
    }

    fn hostile(&mut self, rng: &mut Rng) {
        match rng.below(4) {
            // max_tokens 0: ERROR 400 on a stream that never opens.
            0 => {
                let id = self.next_stream;
                self.next_stream += 1;
                let params = Params {
                    max_tokens: 0,
                    ..Params::default()
                };
                put_request(&mut self.out, id, 0, &params, b"bad");
                self.streams.insert(
                    id,
                    ClientStream {
                        ended: true,
                        duplicates: 1,
                        ..ClientStream::default()
                    },
                );
            }
            // A duplicate of an open stream: ERROR 409, the stream goes on.
            1 => {
                let first = self.open_streams().next().map(|(&id, _)| id);
                if let Some(id) = first {
                    put_request(&mut self.out, id, 0, &Params::default(), b"dup");
                    self.streams.get_mut(&id).expect("open").duplicates += 1;
                }
            }
            // CANCEL and CREDIT of ids never used: ignored.
            2 => {
                put_cancel(&mut self.out, 1 << 40);
                put_credit(&mut self.out, 1 << 41, 5);
            }
            // REQUEST on stream 0: a violation, the connection closes.
            _ => put_request(&mut self.out, 0, 0, &Params::default(), b"zero"),
        }
    }

    fn grant(&mut self, rng: &mut Rng) {
        if self.behavior == Behavior::Stingy {
            return;
        }
        let ids: Vec<u64> = self
            .open_streams()
            .filter(|(_, s)| s.credit.is_some())
            .map(|(&id, _)| id)
            .collect();
        if ids.is_empty() {
            return;
        }
        let id = *rng.pick(&ids);
        let n = rng.range(1, 8) as u32;
        put_credit(&mut self.out, id, n);
        if let Some(c) = &mut self.streams.get_mut(&id).expect("open").credit {
            *c += u64::from(n);
        }
    }

    fn cancel_one(&mut self, rng: &mut Rng) {
        let ids: Vec<u64> = self.open_streams().map(|(&id, _)| id).collect();
        if !ids.is_empty() {
            put_cancel(&mut self.out, *rng.pick(&ids));
        }
    }

    /// Cancels every stream still open (the drain phase's last word).
    pub fn cancel_all(&mut self) {
        let ids: Vec<u64> = self.open_streams().map(|(&id, _)| id).collect();
        for id in ids {
            put_cancel(&mut self.out, id);
        }
    }

    /// Bytes from the server.
    pub fn deliver(&mut self, mut data: &[u8]) {
        loop {
            match self.decoder.next(&mut data) {
                Ok(Some(f)) => {
                    let h = f.header;
                    let (kind, id, arg, aux) = (f.kind, h.stream_id(), h.arg(), h.aux());
                    self.frame(kind, id, arg, aux);
                }
                Ok(None) => return,
                Err(v) => {
                    self.failures
                        .push(format!("server sent bytes the decoder rejects: {}", v.message));
                    return;
                }
            }
        }
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    fn frame(&mut self, kind: Kind, id: u64, arg: u32, aux: u64) {
        if self.conn_error.is_some() {
            return self.fail(format!("{kind:?} after ERROR on stream 0"));
        }
        match kind {
            Kind::HelloAck if self.acked => self.fail("second HELLO_ACK".into()),
            Kind::HelloAck => self.acked = true,
            Kind::Pong => {}
            Kind::Error if id == 0 => self.conn_error = Some(arg),
            Kind::Tokens => self.tokens_frame(id, arg, aux),
            Kind::End | Kind::Error => self.terminal(kind, id, arg, aux),
            other => self.fail(format!("server sent a client frame kind {other:?}")),
        }
    }

    fn tokens_frame(&mut self, id: u64, count: u32, first: u64) {
        let Some(s) = self.streams.get_mut(&id) else {
            return self.fail(format!("TOKENS on stream {id} never opened"));
        };
        let what = if s.ended {
            Some(format!("TOKENS on stream {id} after its end"))
        } else if first != s.received {
            Some(format!(
                "TOKENS on stream {id} start at {first}, {} received",
                s.received
            ))
        } else {
            None
        };
        s.received += u64::from(count);
        let over = s.credit.is_some_and(|c| s.received > c);
        let (received, credit) = (s.received, s.credit);
        self.tokens += u64::from(count);
        if let Some(w) = what {
            self.fail(w);
        }
        if over {
            self.fail(format!("stream {id}: {received} tokens sent with credit {credit:?}"));
        }
    }

    fn terminal(&mut self, kind: Kind, id: u64, arg: u32, aux: u64) {
        let Some(s) = self.streams.get_mut(&id) else {
            return self.fail(format!("{kind:?} on stream {id} never opened"));
        };
        if kind == Kind::Error && s.duplicates > 0 && (arg == code::STREAM_IN_USE || arg == code::BAD_REQUEST) {
            // The answer to a duplicate or bad REQUEST: the stream (if
            // open) goes on.
            s.duplicates -= 1;
            self.errors += 1;
            return;
        }
        if s.ended {
            return self.fail(format!("stream {id} ended twice ({kind:?} {arg})"));
        }
        let reopen = s.duplicates > 0;
        s.ended = true;
        if kind == Kind::End {
            self.ends += 1;
            if aux != s.received {
                let r = s.received;
                self.fail(format!("END on stream {id} counts {aux} tokens, {r} received"));
            }
        } else {
            self.errors += 1;
        }
        if reopen {
            // A duplicate REQUEST sent while this stream was open reaches
            // the server after its end: it opens the id anew.
            let s = self.streams.get_mut(&id).expect("checked above");
            *s = ClientStream {
                duplicates: s.duplicates - 1,
                ..ClientStream::default()
            };
        }
    }
}
