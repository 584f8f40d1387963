//! The soak's hostile actors: garbage senders, whose every connection must
//! end with the server's ERROR on stream 0 and a close, and connection
//! churn, which connects and leaves in every way a client can.

use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;

use cnse_client::{Client, OwnedFrame};
use cnse_proto::{put_hello, put_ping, put_request, HeaderMut, Kind, Params, HEADER_BYTES};

use super::population::{prompt, Ctx, Role, READ_TIMEOUT};
use super::rng::Rng;

/// Garbage modes: what is sent, and the code of the ERROR it must get.
const GARBAGE_MODES: u64 = 11;

fn header(kind: Kind, stream_id: u64, payload_len: u32) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    HeaderMut::new(&mut b).set(kind, 0, stream_id, payload_len, 0, 0);
    b
}

/// Random bytes that cannot start a frame (the first is not `C`).
fn noise(rng: &mut Rng, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + 32 + rng.below(992) as usize, 0);
    rng.fill(&mut out[start..]);
    if out[start] == b'C' {
        out[start] = b'X';
    }
}

/// The bytes of garbage mode `mode` after an optional HELLO, and the
/// code it must bring.
fn garbage(mode: u64, rng: &mut Rng) -> (Vec<u8>, u32) {
    let mut out = Vec::with_capacity(1100);
    if !matches!(mode, 0 | 6) {
        put_hello(&mut out, b"");
    }
    let code = match mode {
        0 | 1 => {
            noise(rng, &mut out);
            400
        }
        2 => {
            let mut h = header(Kind::Ping, 0, 0);
            h[4] = 2; // version
            out.extend_from_slice(&h);
            400
        }
        3 => {
            let mut h = header(Kind::Ping, 0, 0);
            h[5] = 0x06; // no such kind
            out.extend_from_slice(&h);
            400
        }
        4 => {
            let mut h = header(Kind::Ping, 0, 0);
            h[6] = 0xff; // reserved flags
            out.extend_from_slice(&h);
            400
        }
        5 => {
            out.extend_from_slice(&header(Kind::Ping, 0, u32::MAX));
            413
        }
        6 | 8 => {
            let id = if mode == 6 { 1 } else { 0 };
            put_request(&mut out, id, 0, &Params::default(), b"hi");
            400
        }
        7 => {
            put_hello(&mut out, b"");
            400
        }
        _ => {
            let mut h = header(Kind::Ping, 0, 0);
            h[5] = 0x81; // a kind only the server sends
            out.extend_from_slice(&h);
            400
        }
    };
    (out, code)
}

/// One garbage connection; mode 9 first opens a stream and lets it run.
pub fn garbage_connection(ctx: &Ctx, rng: &mut Rng) {
    let mode = rng.below(GARBAGE_MODES);
    match garbage_one(ctx, rng, mode) {
        Ok(()) => ctx.pass(Role::Garbage),
        Err(e) => ctx.fail(Role::Garbage, format!("mode {mode}: {e}")),
    }
}

fn garbage_one(ctx: &Ctx, rng: &mut Rng, mode: u64) -> Result<(), String> {
    let mut c = Client::connect(ctx.addr, READ_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    let (bytes, code) = if mode == 9 {
        // A stream in flight when the garbage comes: it is cancelled with
        // the connection (no END).
        c.hello(b"").map_err(|e| format!("HELLO: {e}"))?;
        let p = Params {
            max_tokens: 200,
            seed: rng.next(),
            ..Params::default()
        };
        c.request(1, 0, &p, &prompt(rng)).map_err(|e| format!("REQUEST: {e}"))?;
        let mut b = Vec::new();
        noise(rng, &mut b);
        (b, 400)
    } else {
        garbage(mode, rng)
    };
    c.write_raw(&bytes).map_err(|e| format!("write: {e}"))?;
    let frames = c
        .read_until_closed(READ_TIMEOUT)
        .map_err(|e| format!("not closed: {e}"))?;
    check_violation(&frames, code, mode == 9)
}

/// The server's last words must be exactly one ERROR `code` on stream 0;
/// before it only HELLO_ACK and, with a stream open, its TOKENS.
fn check_violation(frames: &[OwnedFrame], code: u32, stream_open: bool) -> Result<(), String> {
    let Some(last) = frames.last() else {
        return Err("closed without an ERROR".into());
    };
    if (last.kind, last.stream_id, last.arg) != (Kind::Error, 0, code) {
        return Err(format!(
            "last frame {:?} on stream {} arg {} (want ERROR {code} on stream 0)",
            last.kind, last.stream_id, last.arg
        ));
    }
    for f in &frames[..frames.len() - 1] {
        let fine = f.kind == Kind::HelloAck || (stream_open && f.kind == Kind::Tokens && f.stream_id == 1);
        if !fine {
            return Err(format!("{:?} on stream {} before the ERROR", f.kind, f.stream_id));
        }
    }
    Ok(())
}

/// Closes with SO_LINGER 0: the server sees a reset.
fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid linger struct of the given size on
    // a socket that `s` keeps open for the call.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// One churn connection: connect and leave, with or without HELLO, a PING,
/// a stream in flight, by close or by reset.
pub fn churn_connection(ctx: &Ctx, rng: &mut Rng) {
    let mode = rng.below(6);
    match churn_one(ctx, rng, mode) {
        Ok(()) => ctx.pass(Role::Churn),
        Err(e) => ctx.fail(Role::Churn, format!("mode {mode}: {e}")),
    }
}

fn churn_one(ctx: &Ctx, rng: &mut Rng, mode: u64) -> Result<(), String> {
    let mut c = Client::connect(ctx.addr, READ_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    if mode == 0 {
        return Ok(()); // not a byte sent
    }
    c.hello(b"").map_err(|e| format!("HELLO: {e}"))?;
    match mode {
        1 => {
            let mut ping = Vec::new();
            put_ping(&mut ping, 7, 9, 11, b"churn");
            c.write_raw(&ping).map_err(|e| format!("PING: {e}"))?;
            let f = c.next_frame().map_err(|e| format!("no PONG: {e}"))?;
            if (f.kind, f.stream_id, f.arg, f.aux, f.payload.as_slice()) != (Kind::Pong, 7, 9, 11, b"churn".as_slice())
            {
                return Err(format!("{:?} on stream {} where the PONG was due", f.kind, f.stream_id));
            }
            let _ = c.shutdown(Shutdown::Both);
        }
        2 => reset(c.into_stream().map_err(|e| e.to_string())?),
        3 | 4 => {
            let p = Params {
                max_tokens: 200,
                seed: rng.next(),
                ..Params::default()
            };
            c.request(1, 0, &p, &prompt(rng)).map_err(|e| format!("REQUEST: {e}"))?;
            if mode == 4 {
                reset(c.into_stream().map_err(|e| e.to_string())?);
            }
        }
        _ => {} // HELLO, then a close
    }
    Ok(())
}
