//! The floor under the server's loop: the least a one-thread io_uring
//! responder can do per request over the same sockets and the same ops
//! (multishot accept, multishot recv into a provided-buffer ring, one send
//! per connection per turn): decode frames, answer HELLO, and answer each
//! REQUEST with one TOKENS frame of `--tokens` canned tokens and END. No
//! session, no streams, no backend, no credit, no timeouts.
//!
//! It exists to tell the loop's costs from the kernel's: run `cnse-dp
//! bench --server-pid PID` against it and against `cnse-dp serve`, closed
//! and open loop, and compare requests per server CPU-second
//! (docs/BENCHMARKS.md, "Where the open-loop tail goes").
//!
//! ```sh
//! cargo bench --bench loop_floor -- --listen 127.0.0.1:7900 [--tokens 16] [--cpu 0]
//! ```
//!
//! Not a server: a client that breaks the protocol is dropped, a full
//! output buffer is not bounded beyond what one turn appends, and SIGINT
//! ends it without draining.

use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use cnse_proto::{put_end, put_hello_ack, put_pong, put_tokens, Direction, FinishReason, FrameDecoder, Kind};
use cnse_ring::{opcode, types, BufRing, Completion, Ring, RingConfig, Tag};

cnse_ring::op_kinds! {
    enum Op { Accept = 1, Recv = 2, Send = 3 }
}

const BGID: u16 = 0;
const CONNS_MAX: usize = 16_384;
const PAYLOAD_MAX: u32 = 1 << 20;

struct Conn {
    fd: Option<OwnedFd>,
    decoder: FrameDecoder,
    fill: Vec<u8>,
    flight: Vec<u8>,
    sent: usize,
    sending: bool,
    dirty: bool,
    /// The peer is gone: the fd closes once no send of ours is in flight.
    closed: bool,
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = arg(&args, "--listen") else {
        // `cargo bench` without arguments (a plain bench run): nothing to do.
        eprintln!("loop_floor: give --listen ADDR to serve (see the file's header)");
        return;
    };
    let tokens: u32 = arg(&args, "--tokens").map_or(16, |t| t.parse().expect("--tokens N"));
    if let Some(cpu) = arg(&args, "--cpu") {
        let _ = cnse_ring::pin_current_thread_to(cpu.parse().expect("--cpu N"));
    }
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    println!("listening on {}", listener.local_addr().unwrap());
    let text: Vec<u8> = (0..tokens).flat_map(|_| *b"tok ").collect();
    let mut ring = Ring::new(RingConfig::default()).expect("io_uring");
    let mut bufs = BufRing::new(&ring, BGID, 1024, 16 * 1024).expect("buffer ring");
    let mut conns: Vec<Conn> = Vec::new();
    let mut dirty: Vec<usize> = Vec::with_capacity(CONNS_MAX);
    let accept = opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd())).build();
    // SAFETY: the listener lives until the process exits.
    unsafe { ring.push(accept, Tag::slot(Op::Accept.code(), 0, 0)) }.unwrap();
    let mut cqes: Vec<Completion> = Vec::with_capacity(1 << 15);
    loop {
        cqes.clear();
        ring.turn(Some(Duration::from_secs(1)), &mut cqes).expect("ring turn");
        for c in &cqes {
            let slot = c.tag.slot_index() as usize;
            match Op::from_code(c.tag.kind()) {
                Some(Op::Accept) if c.result >= 0 && conns.len() < CONNS_MAX => {
                    // SAFETY: a fresh descriptor the kernel handed us.
                    let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
                    let one: libc::c_int = 1;
                    // SAFETY: setsockopt reads one c_int we own.
                    unsafe {
                        libc::setsockopt(
                            fd.as_raw_fd(),
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&one as *const libc::c_int).cast(),
                            4,
                        )
                    };
                    let i = conns.len();
                    let recv = opcode::RecvMulti::new(types::Fd(fd.as_raw_fd()), BGID).build();
                    // SAFETY: provided buffers; the socket stays open while the op lives.
                    unsafe { ring.push(recv, Tag::slot(Op::Recv.code(), i as u32, 0)) }.unwrap();
                    conns.push(Conn {
                        fd: Some(fd),
                        decoder: FrameDecoder::new(Direction::ToServer, PAYLOAD_MAX),
                        fill: Vec::with_capacity(64 * 1024),
                        flight: Vec::with_capacity(64 * 1024),
                        sent: 0,
                        sending: false,
                        dirty: false,
                        closed: false,
                    });
                }
                Some(Op::Accept) => {}
                Some(Op::Recv) => {
                    let conn = &mut conns[slot];
                    if c.result <= 0 {
                        if let Some(b) = c.buffer() {
                            bufs.recycle(b);
                        }
                        if !c.more() {
                            conn.closed = true;
                            if !conn.sending {
                                conn.fd = None;
                            }
                        }
                        continue;
                    }
                    let bid = c.buffer().expect("buffer-select recv");
                    let mut input = bufs.get(bid, c.result as usize);
                    while let Ok(Some(f)) = conn.decoder.next(&mut input) {
                        let id = f.header.stream_id();
                        match f.kind {
                            Kind::Hello => put_hello_ack(&mut conn.fill, PAYLOAD_MAX, "loop floor"),
                            Kind::Request => {
                                put_tokens(&mut conn.fill, id, tokens, 0, &text);
                                put_end(&mut conn.fill, id, FinishReason::Length, u64::from(tokens), 0, 0);
                            }
                            Kind::Ping => put_pong(&mut conn.fill, id, f.header.arg(), f.header.aux(), f.payload),
                            _ => {}
                        }
                    }
                    bufs.recycle(bid);
                    if !conn.dirty {
                        conn.dirty = true;
                        dirty.push(slot);
                    }
                }
                Some(Op::Send) => {
                    let conn = &mut conns[slot];
                    conn.sending = false;
                    if c.result < 0 || conn.closed {
                        conn.fd = None;
                        continue;
                    }
                    conn.sent += c.result as usize;
                    if !conn.dirty {
                        conn.dirty = true;
                        dirty.push(slot);
                    }
                }
                None => unreachable!("tag of another loop"),
            }
        }
        bufs.publish();
        for &slot in &dirty {
            let conn = &mut conns[slot];
            conn.dirty = false;
            let Some(fd) = conn.fd.as_ref().map(|f| f.as_raw_fd()) else {
                continue;
            };
            if conn.sending {
                continue;
            }
            if conn.sent >= conn.flight.len() {
                if conn.fill.is_empty() {
                    continue;
                }
                conn.flight.clear();
                std::mem::swap(&mut conn.fill, &mut conn.flight);
                conn.sent = 0;
            }
            let rest = &conn.flight[conn.sent..];
            let send = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build();
            // SAFETY: `flight` is not touched until this send completes.
            unsafe { ring.push(send, Tag::slot(Op::Send.code(), slot as u32, 0)) }.unwrap();
            conn.sending = true;
        }
        dirty.clear();
    }
}
