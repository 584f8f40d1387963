//! The hostile connections of `fault_hostile.rs`: each fault opens its own
//! connection, does one hostile thing with bytes from the seeded RNG, and
//! checks the server answered as the protocol page says (docs/PROTOCOL.md,
//! the shared page): a violation is one ERROR on stream 0 and a close; a
//! bad REQUEST is an ERROR on its stream and the connection serves on;
//! CANCEL and CREDIT of streams that are not open are ignored.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use cnse_proto::{code, put_cancel, put_credit, put_hello, put_ping, put_request, MAGIC, PARAMS_BYTES};

use crate::common::fault::{reset, Rng};
use crate::common::*;

type Fault = fn(SocketAddr, &mut Rng) -> Result<(), String>;

/// Every fault, by name.
pub const FAULTS: [(&str, Fault); 15] = [
    ("garbage", garbage),
    ("bad_kind", bad_kind),
    ("bad_version_or_flags", bad_version_or_flags),
    ("huge_payload_len", huge_payload_len),
    ("request_on_stream_0", request_on_stream_0),
    ("second_hello", second_hello),
    ("frame_before_hello", frame_before_hello),
    ("cancel_credit_unknown_streams", cancel_credit_unknown_streams),
    ("bad_request_params", bad_request_params),
    ("duplicate_stream_id", duplicate_stream_id),
    ("half_frame_then_stall", half_frame_then_stall),
    ("credit_flood_on_a_live_stream", credit_flood_on_a_live_stream),
    ("cancel_storm", cancel_storm),
    ("reset_mid_stream", reset_mid_stream),
    ("requests_then_vanish", requests_then_vanish),
];

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn raw(addr: SocketAddr) -> Result<Client, String> {
    Client::connect(addr, WAIT).map_err(err)
}

fn hello(addr: SocketAddr) -> Result<Client, String> {
    Client::connect_hello(addr, b"", WAIT).map(|(c, _)| c).map_err(err)
}

/// The page's answer to a violation: frames of open streams perhaps, then
/// exactly one ERROR `code` on stream 0 with a message, then the close.
fn violation(c: &mut Client, want: u32) -> Result<(), String> {
    let frames = c.read_until_closed(WAIT).map_err(err)?;
    let errors: Vec<&OwnedFrame> = frames.iter().filter(|f| f.kind == Kind::Error).collect();
    match (errors.as_slice(), frames.last()) {
        ([e], Some(last)) if last.kind == Kind::Error && (e.stream_id, e.arg) == (0, want) && !e.payload.is_empty() => {
            Ok(())
        }
        _ => Err(format!(
            "want one ERROR {want} on stream 0 then the close, got {frames:?}"
        )),
    }
}

/// A PING answered by exactly its PONG, nothing before it: the connection
/// is open and in order.
fn pong(c: &mut Client, rng: &mut Rng) -> Result<(), String> {
    let (id, arg, aux) = (rng.next_u64(), rng.next_u64() as u32, rng.next_u64());
    let mut payload = vec![0u8; rng.range(0, 64) as usize];
    rng.fill(&mut payload);
    c.ping(id, arg, aux, &payload).map_err(err)?;
    let f = c.next_frame().map_err(err)?;
    if (f.kind, f.stream_id, f.arg, f.aux) != (Kind::Pong, id, arg, aux) || f.payload != payload {
        return Err(format!("want the PONG of PING {id}, got {f:?}"));
    }
    Ok(())
}

fn garbage(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = if rng.range(0, 2) == 0 { raw(addr)? } else { hello(addr)? };
    let mut junk = vec![0u8; rng.range(HEADER_BYTES as u64, 600) as usize];
    rng.fill(&mut junk);
    if junk[..4] == MAGIC {
        junk[0] ^= 0xff;
    }
    c.write_raw(&junk).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn bad_kind(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut h = header(Kind::Ping, rng.next_u64(), 0, 0);
    let mut k = rng.next_u64() as u8;
    if (1..=5).contains(&k) {
        k |= 0x80; // a server's kind, which a client may not send
    }
    h[5] = k;
    c.write_raw(&h).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn bad_version_or_flags(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut h = header(Kind::Ping, rng.next_u64(), 0, 0);
    if rng.range(0, 2) == 0 {
        h[4] = match rng.next_u64() as u8 {
            1 => 2,
            v => v,
        };
    } else {
        let flags = (rng.next_u64() as u16).max(1);
        h[6..8].copy_from_slice(&flags.to_le_bytes());
    }
    c.write_raw(&h).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn huge_payload_len(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let len = rng.range(u64::from(cnse_proto::PAYLOAD_BYTES_MAX_DEFAULT) + 1, 1 << 32) as u32;
    let kind = if rng.range(0, 2) == 0 {
        Kind::Ping
    } else {
        Kind::Request
    };
    let mut bytes = header(kind, rng.range(1, 1 << 20), len, 0).to_vec();
    let mut tail = vec![0u8; rng.range(0, 4096) as usize];
    rng.fill(&mut tail);
    bytes.extend_from_slice(&tail);
    c.write_raw(&bytes).map_err(err)?;
    violation(&mut c, code::PAYLOAD_TOO_LARGE)
}

fn request_on_stream_0(addr: SocketAddr, _rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut bytes = Vec::new();
    put_request(&mut bytes, 0, 0, &params(4), b"stream zero");
    c.write_raw(&bytes).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn second_hello(addr: SocketAddr, _rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut bytes = Vec::new();
    put_hello(&mut bytes, b"");
    c.write_raw(&bytes).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn frame_before_hello(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = raw(addr)?;
    let id = rng.range(1, 1 << 20);
    let mut bytes = Vec::new();
    match rng.range(0, 4) {
        0 => put_request(&mut bytes, id, 0, &params(4), b"no hello"),
        1 => put_ping(&mut bytes, id, 0, 0, b""),
        2 => put_credit(&mut bytes, id, 5),
        _ => put_cancel(&mut bytes, id),
    }
    c.write_raw(&bytes).map_err(err)?;
    violation(&mut c, code::BAD_REQUEST)
}

fn cancel_credit_unknown_streams(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut bytes = Vec::new();
    for _ in 0..rng.range(100, 2_000) {
        let id = rng.next_u64().max(1);
        if rng.range(0, 2) == 0 {
            put_credit(&mut bytes, id, rng.next_u64() as u32);
        } else {
            put_cancel(&mut bytes, id);
        }
    }
    c.write_raw(&bytes).map_err(err)?;
    pong(&mut c, rng)
}

fn bad_request_params(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let id = rng.next_u64().max(1);
    let mut payload = params(8).encode().to_vec();
    payload.extend_from_slice(b"a prompt");
    match rng.range(0, 7) {
        0 => payload[0..4].copy_from_slice(&0u32.to_le_bytes()), // max_tokens 0
        1 => payload[0..4].copy_from_slice(&(cnse_proto::MAX_TOKENS_LIMIT_DEFAULT + 1).to_le_bytes()),
        2 => payload[4..8].copy_from_slice(&f32::NAN.to_le_bytes()), // temperature
        3 => payload[8..12].copy_from_slice(&0f32.to_le_bytes()),    // top_p 0
        4 => payload[28..32].copy_from_slice(&(rng.next_u64() as u32).max(1).to_le_bytes()), // reserved
        5 => payload.extend_from_slice(&[0xff, 0xfe, 0xc0]),         // not UTF-8
        _ => payload.truncate(rng.range(0, PARAMS_BYTES as u64) as usize), // short
    }
    c.request_raw(id, 0, &payload).map_err(err)?;
    let f = c.next_frame().map_err(err)?;
    if (f.kind, f.stream_id, f.arg) != (Kind::Error, id, code::BAD_REQUEST) {
        return Err(format!("want ERROR 400 on stream {id}, got {f:?}"));
    }
    pong(&mut c, rng)
}

fn duplicate_stream_id(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let id = rng.next_u64().max(1);
    let p = Params {
        max_tokens: 20,
        seed: rng.next_u64(),
        ..Params::default()
    };
    let mut bytes = Vec::new();
    put_request(&mut bytes, id, 0, &p, b"first under this id");
    put_request(&mut bytes, id, 0, &params(5), b"second under this id");
    c.write_raw(&bytes).map_err(err)?;
    let (mut text, mut tokens, mut refused) = (Vec::new(), 0u64, false);
    loop {
        let f = c.next_frame().map_err(err)?;
        match (f.kind, f.stream_id == id) {
            (Kind::Error, true) if f.arg == code::STREAM_IN_USE && !refused => refused = true,
            (Kind::Tokens, true) if f.aux == tokens => {
                tokens += u64::from(f.arg);
                text.extend_from_slice(&f.payload);
            }
            (Kind::End, true) if (f.arg, f.aux) == (0, 20) && tokens == 20 => break,
            _ => return Err(format!("stream {id}: unexpected {f:?} after {tokens} tokens")),
        }
    }
    if !refused {
        return Err(format!(
            "stream {id}: the second REQUEST under it was not refused with 409"
        ));
    }
    // The first stream's tokens are those the same request gives alone.
    let g = c.generate(id, 0, &p, "first under this id", |_, _| {}).map_err(err)?;
    if g.text != text {
        return Err(format!("stream {id}: tokens differ from the same request alone"));
    }
    Ok(())
}

fn half_frame_then_stall(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let (id, arg, aux) = (rng.next_u64(), rng.next_u64() as u32, rng.next_u64());
    let mut payload = vec![0u8; rng.range(0, 2_000) as usize];
    rng.fill(&mut payload);
    let mut bytes = Vec::new();
    put_ping(&mut bytes, id, arg, aux, &payload);
    let cut = rng.range(1, bytes.len() as u64) as usize;
    c.write_raw(&bytes[..cut]).map_err(err)?;
    std::thread::sleep(Duration::from_millis(rng.range(50, 400)));
    if rng.range(0, 2) == 0 {
        return Ok(()); // and leave mid-frame
    }
    c.write_raw(&bytes[cut..]).map_err(err)?;
    let f = c.next_frame().map_err(err)?;
    if (f.kind, f.stream_id, f.arg, f.aux) != (Kind::Pong, id, arg, aux) || f.payload != payload {
        return Err(format!(
            "a PING cut at byte {cut} and stalled: want its PONG, got {f:?}"
        ));
    }
    Ok(())
}

fn credit_flood_on_a_live_stream(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let id = rng.next_u64().max(1);
    let mut bytes = Vec::new();
    put_request(&mut bytes, id, 1, &params(50), b"flooded with credit");
    for _ in 0..rng.range(10, 500) {
        let grant = match rng.range(0, 3) {
            0 => u32::MAX,
            1 => 0,
            _ => rng.next_u64() as u32,
        };
        put_credit(&mut bytes, id, grant);
    }
    c.write_raw(&bytes).map_err(err)?;
    let mut tokens = 0u64;
    loop {
        let f = c.next_frame().map_err(err)?;
        match f.kind {
            Kind::Tokens if f.stream_id == id && f.aux == tokens => tokens += u64::from(f.arg),
            Kind::End if f.stream_id == id && (f.arg, f.aux) == (0, 50) && tokens == 50 => return pong(&mut c, rng),
            _ => return Err(format!("stream {id}: unexpected {f:?} after {tokens} tokens")),
        }
    }
}

fn cancel_storm(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let n = rng.range(1, 9);
    let mut bytes = Vec::new();
    for id in 1..=n {
        put_request(&mut bytes, id, rng.range(0, 4) as u32, &params(10_000), b"cancelled");
    }
    for id in 1..=n {
        put_cancel(&mut bytes, id);
        put_cancel(&mut bytes, id);
        put_cancel(&mut bytes, id + 1_000);
    }
    c.write_raw(&bytes).map_err(err)?;
    let mut ended = vec![false; n as usize + 1];
    while ended.iter().skip(1).any(|e| !e) {
        let f = c.next_frame().map_err(err)?;
        let open = (1..=n).contains(&f.stream_id) && !ended[f.stream_id as usize];
        match f.kind {
            Kind::Tokens if open => {}
            Kind::End if open && f.arg == FinishReason::Cancelled as u32 => ended[f.stream_id as usize] = true,
            _ => return Err(format!("unexpected {f:?} (ended so far: {ended:?})")),
        }
    }
    pong(&mut c, rng)
}

fn reset_mid_stream(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(err)?;
    let mut bytes = Vec::new();
    put_hello(&mut bytes, b"");
    put_request(&mut bytes, rng.next_u64().max(1), 0, &params(10_000), b"reset me");
    s.write_all(&bytes).map_err(err)?;
    s.set_read_timeout(Some(WAIT)).map_err(err)?;
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).map_err(err)?;
    if n == 0 {
        return Err("closed before any answer".into());
    }
    reset(s);
    Ok(())
}

fn requests_then_vanish(addr: SocketAddr, rng: &mut Rng) -> Result<(), String> {
    let mut c = hello(addr)?;
    let mut bytes = Vec::new();
    for id in 1..=rng.range(1, 50) {
        put_request(&mut bytes, id, 0, &params(1_000), b"nobody reads this");
    }
    c.write_raw(&bytes).map_err(err)
}
