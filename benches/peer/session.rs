//! The protocol subset every peer server in `benches/` speaks, pure (bytes
//! in, bytes out, no I/O): HELLO/HELLO_ACK, PING/PONG, REQUEST answered by
//! a zero-delay synthetic model within the stream's credit (CREDIT sends
//! more, CANCEL ends the stream), TOKENS/END. The text is cnse-dp's
//! zero-delay synthetic text (`cnse_backend::synthetic`: the same prompt
//! and seed give the same bytes), and a stream's tokens go out as cnse-dp
//! sends them at zero delay: everything the credit allows in one TOKENS
//! frame, END as soon as the last token is out.
//!
//! Each runtime (tokio, tokio-uring, monoio) wraps a [`Session`] per
//! connection in the accept/read/write loop its authors would write, so the
//! comparison is between runtimes and loops, not protocol code.

use std::time::Instant;

use cnse_backend::synthetic::{prompt_hash, HashPicker, PickRow, PickRun, Picker, Vocab, WordRun};
use cnse_proto::{
    code, put_end, put_error, put_hello_ack, put_pong, put_tokens, Direction, FinishReason, FrameDecoder, Kind,
    ParamLimits, Params, PAYLOAD_BYTES_MAX_DEFAULT,
};

/// Streams per connection waiting for credit (ERROR 429 above), as
/// cnse-dp's `--streams-per-conn-max` default.
pub const STREAMS_PER_CONN_MAX: usize = 256;
/// Receive buffer per connection.
pub const READ_BUFFER_BYTES: usize = 64 * 1024;

/// A stream whose tokens wait for credit.
#[derive(Clone, Copy)]
struct Waiting {
    id: u64,
    seed: u64,
    next: u32,
    max_tokens: u32,
    /// Tokens the client may still take.
    credit: u64,
    arrived: Instant,
}

/// What became of the input: the connection goes on, or it must be closed
/// once `out` is written (a protocol violation was answered).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Open,
    Close,
}

/// One connection's protocol state.
pub struct Session {
    decoder: FrameDecoder,
    hello: bool,
    waiting: Vec<Waiting>,
    /// One TOKENS frame's token ids and text (reused).
    ids: Vec<u32>,
    text: WordRun,
    name: &'static str,
    vocab: &'static Vocab,
}

impl Session {
    pub fn new(name: &'static str) -> Self {
        Session {
            decoder: FrameDecoder::new(Direction::ToServer, PAYLOAD_BYTES_MAX_DEFAULT),
            hello: false,
            waiting: Vec::with_capacity(STREAMS_PER_CONN_MAX),
            ids: Vec::new(),
            text: WordRun::default(),
            name,
            vocab: Vocab::shared(),
        }
    }

    /// Handles every whole frame of `input` (any split of the stream),
    /// appending the replies to `out`. `now` is the read's time (one clock
    /// read per read, as cnse-dp's loop takes one per turn).
    pub fn on_input(&mut self, mut input: &[u8], now: Instant, out: &mut Vec<u8>) -> Verdict {
        loop {
            let frame = match self.decoder.next(&mut input) {
                Ok(Some(f)) => f,
                Ok(None) => return Verdict::Open,
                Err(v) => {
                    put_error(out, 0, v.code, v.message);
                    return Verdict::Close;
                }
            };
            let (id, arg) = (frame.header.stream_id(), frame.header.arg());
            if !self.hello {
                if frame.kind != Kind::Hello {
                    put_error(out, 0, code::BAD_REQUEST, "HELLO must come first");
                    return Verdict::Close;
                }
                self.hello = true;
                put_hello_ack(out, PAYLOAD_BYTES_MAX_DEFAULT, self.name);
                continue;
            }
            match frame.kind {
                Kind::Ping => put_pong(out, id, arg, frame.header.aux(), frame.payload),
                Kind::Request if id == 0 => {
                    put_error(out, 0, code::BAD_REQUEST, "REQUEST on stream 0");
                    return Verdict::Close;
                }
                Kind::Request => {
                    let (seed, max_tokens) = match Params::parse(frame.payload, &ParamLimits::default()) {
                        Ok(r) => (prompt_hash(r.prompt) ^ r.params.seed, r.params.max_tokens),
                        Err((c, m)) => {
                            put_error(out, id, c, m);
                            continue;
                        }
                    };
                    if self.waiting.iter().any(|w| w.id == id) {
                        put_error(out, id, code::STREAM_IN_USE, "stream id in use");
                        continue;
                    }
                    let credit = if arg == 0 { u64::MAX } else { u64::from(arg) };
                    let w = Waiting {
                        id,
                        seed,
                        next: 0,
                        max_tokens,
                        credit,
                        arrived: now,
                    };
                    if let Some(w) = self.advance(w, now, out) {
                        if self.waiting.len() == STREAMS_PER_CONN_MAX {
                            put_error(out, id, code::OVERLOADED, "too many streams waiting for credit");
                        } else {
                            self.waiting.push(w);
                        }
                    }
                }
                Kind::Credit => {
                    if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
                        let mut w = self.waiting[i];
                        w.credit = w.credit.saturating_add(u64::from(arg));
                        match self.advance(w, now, out) {
                            Some(w) => self.waiting[i] = w,
                            None => {
                                self.waiting.swap_remove(i);
                            }
                        }
                    }
                }
                Kind::Cancel => {
                    if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
                        let w = self.waiting.swap_remove(i);
                        let us = micros(now, w.arrived);
                        put_end(out, id, FinishReason::Cancelled, u64::from(w.next), us, us);
                    }
                }
                Kind::Hello | Kind::HelloAck | Kind::Tokens | Kind::End | Kind::Error | Kind::Pong => {
                    put_error(out, 0, code::BAD_REQUEST, "frame kind not sent by clients");
                    return Verdict::Close;
                }
            }
        }
    }

    /// Sends what the credit allows of stream `w` in one TOKENS frame, and
    /// END when the last token is out; the stream back when it waits for
    /// credit.
    fn advance(&mut self, mut w: Waiting, now: Instant, out: &mut Vec<u8>) -> Option<Waiting> {
        let n = u64::from(w.max_tokens - w.next).min(w.credit) as u32;
        if n > 0 {
            self.pick_text(w.seed, w.next, n);
            put_tokens(out, w.id, n, u64::from(w.next), self.text.text());
            w.next += n;
            w.credit -= u64::from(n);
        }
        if w.next < w.max_tokens {
            return Some(w);
        }
        let us = micros(now, w.arrived);
        put_end(out, w.id, FinishReason::Length, u64::from(w.max_tokens), us, us);
        None
    }

    /// The text of tokens `first..first + n` of the stream seeded `seed`
    /// into `self.text` (the synthetic backend's hash picker and words).
    fn pick_text(&mut self, seed: u64, first: u32, n: u32) {
        let run = PickRun {
            first: PickRow {
                seed,
                position: u64::from(first),
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
            },
            tokens: n,
        };
        self.ids.resize(n as usize, 0);
        HashPicker
            .pick(std::slice::from_ref(&run), &mut self.ids)
            .expect("the hash picker cannot fail");
        self.text.clear();
        self.text.extend(self.vocab, &self.ids);
    }
}

fn micros(now: Instant, then: Instant) -> u64 {
    now.saturating_duration_since(then).as_micros() as u64
}

/// `--name value` from the command line.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The peers' shared command line: `--listen ADDR [--threads N] [--cpus
/// a,b,...]`; `None` (and a line on stderr) without `--listen`, as under a
/// plain `cargo bench`.
pub struct PeerArgs {
    pub listen: std::net::SocketAddr,
    pub threads: usize,
    pub cpus: Vec<usize>,
}

impl PeerArgs {
    pub fn parse(peer: &str) -> Option<PeerArgs> {
        let args: Vec<String> = std::env::args().collect();
        let Some(listen) = arg(&args, "--listen") else {
            eprintln!("{peer}: give --listen ADDR [--threads N] [--cpus 0,1] to serve (see the file's header)");
            return None;
        };
        let listen = listen.parse().unwrap_or_else(|e| panic!("--listen {listen}: {e}"));
        let threads = arg(&args, "--threads").map_or(1, |t| t.parse().expect("--threads N"));
        assert!(threads >= 1, "--threads must be >= 1");
        let cpus = arg(&args, "--cpus").map_or(Vec::new(), |c| {
            c.split(',').map(|x| x.parse().expect("--cpus a,b,...")).collect()
        });
        Some(PeerArgs { listen, threads, cpus })
    }
}

/// A listening socket with SO_REUSEPORT (and SO_REUSEADDR) set before
/// `bind`, so that every thread binds its own listener to one port and the
/// kernel spreads connections over them (the thread-per-core way to
/// accept). Port 0 is resolved by the first bind; pass its port to the
/// others.
pub fn reuseport_listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        return Err(std::io::Error::other("the peers listen on IPv4"));
    };
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own; the listener closes it on drop
    // (also on the error paths below).
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
        // SAFETY: setsockopt reads one c_int we own.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: bind reads one sockaddr_in we own, of the length given.
    let r = unsafe {
        libc::bind(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: listen on the bound socket we own.
    if unsafe { libc::listen(fd, 4096) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(listener)
}

/// Binds one listener per thread on one port (the first resolves port 0)
/// and prints `listening on ADDR`, the line scripts wait for.
fn listeners(args: &PeerArgs) -> Vec<std::net::TcpListener> {
    let first = reuseport_listener(args.listen).unwrap_or_else(|e| panic!("bind {}: {e}", args.listen));
    let addr = first.local_addr().expect("a bound listener has an address");
    let mut all = vec![first];
    for _ in 1..args.threads {
        all.push(reuseport_listener(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
    }
    println!("listening on {addr}");
    all
}

/// Pins the calling thread to the `t`-th CPU of `--cpus` (round robin);
/// without `--cpus` the thread stays free.
fn pin(cpus: &[usize], t: usize) {
    if let Some(&cpu) = cpus.get(t % cpus.len().max(1)) {
        let _ = cnse_ring::pin_current_thread_to(cpu);
    }
}

/// The shape every peer shares, thread per core: one thread per
/// `--threads`, pinned as `--cpus` says, each running `run` on its own
/// SO_REUSEPORT listener (the runtime and its accept loop are the peer's
/// own); returns when they all end.
pub fn thread_per_core(args: &PeerArgs, run: fn(std::net::TcpListener)) {
    let threads: Vec<_> = listeners(args)
        .into_iter()
        .enumerate()
        .map(|(t, listener)| {
            let cpus = args.cpus.clone();
            std::thread::spawn(move || {
                pin(&cpus, t);
                run(listener);
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

/// Sets TCP_NODELAY on an accepted socket (the frames are small and
/// latency-bound, as cnse-dp sets it).
pub fn nodelay(fd: std::os::fd::RawFd) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int we own; a closed fd only fails.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
