//! Properties of the 32-byte frame header:
//! - `validate` gives exactly the page's answer for any 32 bytes, any
//!   payload limit and either direction: 400 for bad magic, version, kind
//!   (or a kind of the other side) and flags, in that order, then 413 for
//!   a payload over the limit (checked against an independent model here);
//! - encode then view round-trips every field, at any offset;
//! - a header that passes re-encodes to the very same bytes.
#![no_main]

use cnse_proto::{code, Direction, Header, HeaderMut, Kind, HEADER_BYTES, MAGIC, VERSION};
use libfuzzer_sys::fuzz_target;

/// The page's checks, written out from docs/PROTOCOL.md.
fn model(b: &[u8; HEADER_BYTES], limit: u32, dir: Direction) -> Result<u8, (u32, &'static str)> {
    if b[0..4] != MAGIC {
        return Err((code::BAD_REQUEST, "bad magic"));
    }
    if b[4] != VERSION {
        return Err((code::BAD_REQUEST, "unsupported version"));
    }
    let client_kinds = [0x01, 0x02, 0x03, 0x04, 0x05];
    let server_kinds = [0x81, 0x82, 0x83, 0x84, 0x85];
    let legal = match dir {
        Direction::ToServer => &client_kinds,
        Direction::ToClient => &server_kinds,
    };
    if !legal.contains(&b[5]) {
        return Err((code::BAD_REQUEST, "unknown frame kind"));
    }
    // docs/PROTOCOL.md extensions: "Session keys", REQUEST flag bit 0;
    // "Failover marks", END flag bit 0.
    let defined: u16 = match b[5] {
        0x02 | 0x83 => 1,
        _ => 0,
    };
    if u16::from_le_bytes([b[6], b[7]]) & !defined != 0 {
        return Err((code::BAD_REQUEST, "reserved flag bits set"));
    }
    if u32::from_le_bytes(b[16..20].try_into().unwrap()) > limit {
        return Err((code::PAYLOAD_TOO_LARGE, "payload larger than the limit"));
    }
    Ok(b[5])
}

fuzz_target!(|input: &[u8]| {
    if input.len() < HEADER_BYTES + 6 {
        return;
    }
    let bytes: &[u8; HEADER_BYTES] = input[..HEADER_BYTES].try_into().unwrap();
    let limit = u32::from_le_bytes(input[HEADER_BYTES..HEADER_BYTES + 4].try_into().unwrap());
    let dir = if input[HEADER_BYTES + 4] & 1 == 0 {
        Direction::ToServer
    } else {
        Direction::ToClient
    };
    let offset = usize::from(input[HEADER_BYTES + 5] % 16);

    // The view sees the bytes as they are, at any offset.
    let mut shifted = vec![0u8; offset + HEADER_BYTES];
    shifted[offset..].copy_from_slice(bytes);
    let h = Header::view(&shifted[offset..]).expect("32 bytes");
    assert_eq!(h.as_bytes(), bytes);
    assert!(Header::view(&bytes[..HEADER_BYTES - 1]).is_none());

    let got = h.validate(limit, dir).map(|k| k as u8).map_err(|v| (v.code, v.message));
    assert_eq!(got, model(bytes, limit, dir));

    // Encoding the fields back gives the same fields, and the same bytes
    // for a header that passed.
    if let Some(kind) = h.kind() {
        let mut out = [0xa5u8; HEADER_BYTES + 16];
        HeaderMut::new(&mut out[offset..]).set(kind, h.flags(), h.stream_id(), h.payload_len(), h.arg(), h.aux());
        let back = Header::view(&out[offset..]).unwrap();
        assert_eq!(
            (
                back.kind(),
                back.flags(),
                back.stream_id(),
                back.payload_len(),
                back.arg(),
                back.aux()
            ),
            (Some(kind), h.flags(), h.stream_id(), h.payload_len(), h.arg(), h.aux())
        );
        assert_eq!((back.magic(), back.version()), (MAGIC, VERSION));
        assert!(
            out[offset + HEADER_BYTES..].iter().all(|&b| b == 0xa5),
            "wrote past the header"
        );
        if got.is_ok() {
            assert_eq!(back.as_bytes(), bytes);
            assert_eq!(back.validate(limit, dir).map(|k| k as u8), Ok(kind as u8));
        }
    }
    assert!(Kind::from_u8(bytes[5]).is_none_or(|k| k as u8 == bytes[5]));
});
