//! One connection of the load generator on the ring: its socket, its
//! receive and send buffers, and its two ops, each an explicit state. A
//! buffer whose op is [`OpState::InFlight`] belongs to the kernel and is not
//! touched until that op's completion is reaped.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use cnse_proto::{Direction, FrameDecoder, Kind, HEADER_BYTES};
use cnse_ring::{opcode, types, Ring, RingConfig, Tag};

use super::config::{LoadConfig, Mode};
use super::http::{Closed, HttpRx};
use super::resp::RespRx;
use super::streams::{lose, on_frame, Ctx, Slot, Streams};
use super::CONNECTIONS_MAX;
use crate::{Client, ClientError, CLIENT_PAYLOAD_BYTES_MAX};

cnse_ring::op_kinds! {
    /// The generator's ops: one recv and at most one send per connection,
    /// tagged with the connection's index.
    pub(super) enum Op { Recv = 1, Send = 2 }
}

const RECV_BUFFER_BYTES: usize = 64 << 10;
/// Connections keep their index for the whole run (the table never reuses
/// an entry), so every tag carries generation 0.
const GENERATION: u32 = 0;
const _: () = assert!(Tag::check_slots(CONNECTIONS_MAX));

/// Where one op of a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum OpState {
    /// Nothing of ours is in the kernel: the op's buffer is ours.
    Idle,
    /// Submitted; the buffer is the kernel's until the completion. A lost
    /// connection's ops stay here until `shutdown` makes them complete, and
    /// the ring's teardown cancels and drains whatever is left.
    InFlight,
}

/// How a connection reads what the server sends: one parser per mode.
enum Parser {
    /// cnse-dp's binary protocol (`ping`, `generate`).
    Binary(FrameDecoder),
    /// The OpenAI HTTP front (`http`).
    Http(Box<HttpRx>),
    /// A redis-compatible server (`resp`).
    Resp(Box<RespRx>),
}

pub(super) struct Conn {
    /// Owns the fd (closed on drop, after the ring's teardown, or when an
    /// HTTP connection is opened again with no op in flight).
    sock: TcpStream,
    fd: RawFd,
    rbuf: Box<[u8]>,
    parser: Parser,
    /// Frames handed to the kernel; untouched until the send completes.
    wire: Vec<u8>,
    wire_off: usize,
    recv: OpState,
    send: OpState,
    /// In the loop's list of connections with frames to send.
    queued: bool,
    /// HTTP mode: the server closed between responses while our send was
    /// in flight; the connection is opened again when it completes.
    reopen_due: bool,
    addr: SocketAddr,
    connect_timeout: Duration,
    pub(super) st: Streams,
}

/// A new HTTP or RESP connection (no HELLO), ready for the ring.
fn connect_plain(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ClientError> {
    let io = |op, source| ClientError::Io { op, addr, source };
    let s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io("connect", e))?;
    let _ = s.set_nodelay(true);
    s.set_nonblocking(true).map_err(|e| io("set non-blocking", e))?;
    Ok(s)
}

/// The ring and the connections of one client thread, HELLO done.
pub(super) fn setup(conns_n: usize, cfg: &LoadConfig) -> Result<(Ring, Vec<Conn>), ClientError> {
    let entries = (2 * conns_n + 64).next_power_of_two().clamp(256, 32_768) as u32;
    let ring = Ring::new(RingConfig {
        entries,
        cq_factor: 2,
        single_issuer: true,
        ..RingConfig::default()
    })?;
    let mut conns = Vec::with_capacity(conns_n);
    let out_bytes = match &cfg.mode {
        Mode::Ping { payload_bytes } => HEADER_BYTES + payload_bytes,
        Mode::Generate { prompt, .. } => 2 * HEADER_BYTES + 32 + prompt.len(),
        Mode::Http { prompt, .. } => 320 + prompt.len(),
        Mode::Resp => super::resp::PING.len(),
    } * cfg.inflight
        + 4096;
    let parser = || match cfg.mode {
        Mode::Ping { .. } | Mode::Generate { .. } => {
            Parser::Binary(FrameDecoder::new(Direction::ToClient, CLIENT_PAYLOAD_BYTES_MAX))
        }
        Mode::Http { .. } => Parser::Http(Box::new(HttpRx::new())),
        Mode::Resp => Parser::Resp(Box::new(RespRx::new())),
    };
    for _ in 0..conns_n {
        let addr = cfg.addr;
        let parser = parser();
        let sock = if !matches!(parser, Parser::Binary(_)) {
            connect_plain(addr, cfg.connect_timeout)?
        } else {
            let (client, _ack) = Client::connect_hello(cfg.addr, &cfg.auth_token, cfg.connect_timeout)?;
            let sock = client.into_stream()?;
            sock.set_nonblocking(true).map_err(|source| ClientError::Io {
                op: "set non-blocking",
                addr,
                source,
            })?;
            sock
        };
        let fd = sock.as_raw_fd();
        conns.push(Conn {
            sock,
            fd,
            rbuf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            parser,
            wire: Vec::with_capacity(out_bytes),
            wire_off: 0,
            recv: OpState::Idle,
            send: OpState::Idle,
            queued: false,
            reopen_due: false,
            addr,
            connect_timeout: cfg.connect_timeout,
            st: Streams {
                fd,
                free: Vec::with_capacity(cfg.inflight),
                ready: false,
                out: Vec::with_capacity(out_bytes),
                alive: true,
                busy: 0,
                slots: vec![Slot::default(); cfg.inflight].into_boxed_slice(),
                order: std::collections::VecDeque::with_capacity(cfg.inflight),
            },
        });
    }
    Ok((ring, conns))
}

/// Adds connection `c` to the loop's send list once.
pub(super) fn queue_send(conn: &mut Conn, c: u32, dirty: &mut Vec<u32>) {
    if !conn.queued {
        conn.queued = true;
        dirty.push(c);
    }
}

impl Conn {
    pub(super) fn arm_recv(&mut self, ring: &mut Ring, c: u32) -> Result<(), ClientError> {
        debug_assert_eq!(self.recv, OpState::Idle);
        let e = opcode::Recv::new(types::Fd(self.fd), self.rbuf.as_mut_ptr(), self.rbuf.len() as u32).build();
        // SAFETY: `rbuf` is a boxed slice this connection owns (it does not
        // move with the table) and `recv` is InFlight until the completion,
        // so nothing reads or frees it meanwhile; the socket stays open
        // until the ring's teardown has drained every op.
        unsafe { ring.push(e, Tag::slot(Op::Recv.code(), c, GENERATION))? };
        self.recv = OpState::InFlight;
        Ok(())
    }

    fn arm_send(&mut self, ring: &mut Ring, c: u32) -> Result<(), ClientError> {
        debug_assert!(self.send == OpState::Idle && self.wire_off < self.wire.len());
        let rest = &self.wire[self.wire_off..];
        let e = opcode::Send::new(types::Fd(self.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        // SAFETY: `wire` is neither written nor swapped while `send` is
        // InFlight (see `flush`), and the socket stays open until the ring's
        // teardown has drained every op.
        unsafe { ring.push(e, Tag::slot(Op::Send.code(), c, GENERATION))? };
        self.send = OpState::InFlight;
        Ok(())
    }

    /// Hands this turn's frames to the kernel, unless a send is still in
    /// flight (they then leave with the next one).
    pub(super) fn flush(&mut self, ring: &mut Ring, c: u32) -> Result<(), ClientError> {
        self.queued = false;
        let closing = matches!(&self.parser, Parser::Http(rx) if rx.closing());
        if self.st.alive && !closing && self.send == OpState::Idle && !self.st.out.is_empty() {
            std::mem::swap(&mut self.st.out, &mut self.wire);
            self.wire_off = 0;
            self.arm_send(ring, c)?;
        }
        Ok(())
    }

    pub(super) fn on_recv(
        &mut self,
        ring: &mut Ring,
        c: u32,
        result: i32,
        now: u64,
        ctx: &mut Ctx,
    ) -> Result<(), ClientError> {
        debug_assert_eq!(self.recv, OpState::InFlight);
        self.recv = OpState::Idle;
        if result > 0 {
            self.on_bytes(c, result as usize, now, ctx);
            if self.st.alive {
                self.arm_recv(ring, c)?;
            }
        } else if matches!(-result, libc::EINTR | libc::EAGAIN | libc::ENOBUFS) {
            self.arm_recv(ring, c)?;
        } else if self.is_http() && self.st.alive {
            self.http_closed(ring, c, now, ctx)?;
        } else {
            // 0: the server closed; anything else is the connection's end too.
            lose(&mut self.st, ctx);
        }
        Ok(())
    }

    /// HTTP mode: the server closed the connection (or it failed). Between
    /// responses it is opened again and what got no answer is sent again,
    /// once no op of ours is in the kernel; inside a response it is lost.
    fn http_closed(&mut self, ring: &mut Ring, c: u32, now: u64, ctx: &mut Ctx) -> Result<(), ClientError> {
        let Parser::Http(rx) = &mut self.parser else {
            unreachable!("only HTTP connections are opened again")
        };
        if rx.on_close() == Closed::Lost {
            lose(&mut self.st, ctx);
            return Ok(());
        }
        if self.send == OpState::InFlight {
            self.reopen_due = true;
            // SAFETY: shutdown on the fd this connection owns: the send in
            // flight completes (and hands its buffer back) at once.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
            return Ok(());
        }
        self.reopen(ring, c, now, ctx)
    }

    /// Opens the HTTP connection again (no op of ours is in the kernel:
    /// the old socket is closed here) and writes the unanswered requests
    /// for it, oldest first.
    fn reopen(&mut self, ring: &mut Ring, c: u32, now: u64, ctx: &mut Ctx) -> Result<(), ClientError> {
        debug_assert!(self.recv == OpState::Idle && self.send == OpState::Idle);
        self.reopen_due = false;
        if ctx.stopping && self.st.order.is_empty() {
            // Nothing to send any more: leave it closed.
            return Ok(());
        }
        let sock = match connect_plain(self.addr, self.connect_timeout) {
            Ok(s) => s,
            Err(_) => {
                lose(&mut self.st, ctx);
                return Ok(());
            }
        };
        self.fd = sock.as_raw_fd();
        self.st.fd = self.fd;
        // Closes the old socket: nothing of ours is in flight on it.
        self.sock = sock;
        if let Parser::Http(rx) = &mut self.parser {
            rx.reopened();
        }
        self.wire.clear();
        self.wire_off = 0;
        self.st.out.clear();
        for k in 0..self.st.order.len() {
            let s = self.st.order[k] as usize;
            self.st.http_resend(s, now, ctx);
        }
        ctx.stats.reconnects += 1;
        ctx.stats.resent += self.st.order.len() as u64;
        self.arm_recv(ring, c)
    }

    pub(super) fn on_send(
        &mut self,
        ring: &mut Ring,
        c: u32,
        result: i32,
        now: u64,
        ctx: &mut Ctx,
    ) -> Result<(), ClientError> {
        debug_assert_eq!(self.send, OpState::InFlight);
        self.send = OpState::Idle;
        if self.reopen_due {
            // The server had closed; whatever this send did is sent again.
            return self.reopen(ring, c, now, ctx);
        }
        if result >= 0 {
            self.wire_off += result as usize;
            if self.wire_off < self.wire.len() {
                self.arm_send(ring, c)?;
            } else {
                self.wire.clear();
                self.wire_off = 0;
            }
        } else if matches!(-result, libc::EINTR | libc::EAGAIN) {
            self.arm_send(ring, c)?;
        } else if self.is_http() && self.st.alive {
            // The server closed or reset the connection: the recv in flight
            // reports it (the shutdown makes sure it completes), and
            // `http_closed` decides whether it is opened again.
            // SAFETY: shutdown on the fd this connection owns.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        } else {
            lose(&mut self.st, ctx);
        }
        Ok(())
    }

    fn is_http(&self) -> bool {
        matches!(self.parser, Parser::Http(_))
    }

    fn on_bytes(&mut self, c: u32, n: usize, now: u64, ctx: &mut Ctx) {
        let Conn { rbuf, parser, st, .. } = self;
        let input = &rbuf[..n];
        let fed = match parser {
            Parser::Binary(decoder) => {
                feed_binary(decoder, input, st, c as usize, now, ctx);
                return;
            }
            Parser::Http(rx) => rx.feed(input, st, c as usize, now, ctx),
            Parser::Resp(rx) => rx.feed(input, st, c as usize, now, ctx),
        };
        if fed.is_err() {
            ctx.stats.bad_frames += 1;
            lose(st, ctx);
        }
    }
}

/// Binary mode: every whole frame in `input` to its stream.
fn feed_binary(decoder: &mut FrameDecoder, mut input: &[u8], st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) {
    loop {
        // Header fields are copied out and the payload checked in place,
        // so the decoder's borrow ends before the handler runs.
        let (kind, id, arg, aux, check) = match decoder.next(&mut input) {
            Ok(Some(f)) => {
                let check = match f.kind {
                    // Empty payloads skip the comparison: a call to
                    // memcmp per PONG was a tenth of a 0-byte PING
                    // run's load thread.
                    Kind::Pong => {
                        f.payload.len() == ctx.ping_payload.len()
                            && (f.payload.is_empty() || f.payload == ctx.ping_payload)
                    }
                    Kind::End => f.payload.len() >= cnse_proto::END_PAYLOAD_BYTES,
                    _ => true,
                };
                (f.kind, f.header.stream_id(), f.header.arg(), f.header.aux(), check)
            }
            Ok(None) => return,
            Err(_) => {
                ctx.stats.bad_frames += 1;
                lose(st, ctx);
                return;
            }
        };
        on_frame(st, c, kind, id, arg, aux, check, now, ctx);
        if !st.alive {
            return;
        }
    }
}
