//! Extension (docs/PROTOCOL.md, "Session keys"): a REQUEST may carry a
//! session key that pins a conversation to one model server.
//!
//! With [`REQUEST_FLAG_SESSION_KEY`] set in the REQUEST header's `flags`,
//! the payload is: the 32-byte parameter block, a u16 (little-endian) key
//! length `n` in `1..=SESSION_KEY_BYTES_MAX`, `n` key bytes (visible ASCII,
//! 0x21..=0x7E), then the prompt as UTF-8. Without the flag the payload is
//! the contract's (parameter block, prompt). The parameter block's reserved
//! field stays 0 either way.

use crate::encode::put_frame;
use crate::{code, HeaderMut, Kind, ParamLimits, Params, Request, HEADER_BYTES, PARAMS_BYTES};

/// REQUEST flag bit 0: the payload carries a session key before the prompt.
pub const REQUEST_FLAG_SESSION_KEY: u16 = 1 << 0;
/// Longest session key, in bytes.
pub const SESSION_KEY_BYTES_MAX: usize = 256;
/// Bytes of the key's length field.
pub const SESSION_KEY_LEN_BYTES: usize = 2;

/// Whether `key` is a valid session key: 1..=256 bytes of visible ASCII
/// (the same set on the binary protocol and in HTTP's `X-Session-Id`).
pub fn session_key_valid(key: &[u8]) -> bool {
    (1..=SESSION_KEY_BYTES_MAX).contains(&key.len()) && key.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// Decodes a REQUEST payload by its header `flags`: the request and, with
/// [`REQUEST_FLAG_SESSION_KEY`], the session key, borrowed in place (no
/// allocation). The error is the ERROR on the request's own stream (the
/// connection stays open). Flags other than the defined ones never reach
/// here: the header check makes them a violation.
pub fn parse_request<'a>(
    payload: &'a [u8],
    flags: u16,
    limits: &ParamLimits,
) -> Result<(Request<'a>, Option<&'a str>), (u32, &'static str)> {
    if flags & REQUEST_FLAG_SESSION_KEY == 0 {
        return Params::parse(payload, limits).map(|r| (r, None));
    }
    let bad = |m| Err((code::BAD_REQUEST, m));
    if payload.len() < PARAMS_BYTES + SESSION_KEY_LEN_BYTES {
        return bad("request payload shorter than the parameter block and the session key length");
    }
    let (block, rest) = payload.split_at(PARAMS_BYTES);
    let n = usize::from(u16::from_le_bytes([rest[0], rest[1]]));
    let rest = &rest[SESSION_KEY_LEN_BYTES..];
    if n == 0 || n > SESSION_KEY_BYTES_MAX {
        return bad("session key length must be 1..=256");
    }
    if rest.len() < n {
        return bad("session key longer than the payload");
    }
    let (key, prompt) = rest.split_at(n);
    if !session_key_valid(key) {
        return bad("session key must be visible ASCII (0x21-0x7e)");
    }
    // The block is checked alone (an empty prompt is valid), then the prompt.
    let params = Params::parse(block, limits)?.params;
    let Some(prompt) = crate::params::utf8(prompt) else {
        return bad("prompt is not valid UTF-8");
    };
    let key = std::str::from_utf8(key).expect("visible ASCII is UTF-8");
    Ok((Request { params, prompt }, Some(key)))
}

/// Client side: REQUEST carrying `key` (the caller checks it with
/// [`session_key_valid`]; a server answers 400 otherwise).
pub fn put_request_with_session(
    out: &mut Vec<u8>,
    stream_id: u64,
    credit: u32,
    params: &Params,
    key: &[u8],
    prompt: &[u8],
) {
    let block: [u8; PARAMS_BYTES] = params.encode();
    let len = u16::try_from(key.len()).unwrap_or(u16::MAX).to_le_bytes();
    let at = out.len();
    put_frame(out, Kind::Request, stream_id, credit, 0, &[&block, &len, key, prompt]);
    let payload_len = (out.len() - at - HEADER_BYTES) as u32;
    HeaderMut::new(&mut out[at..at + HEADER_BYTES]).set(
        Kind::Request,
        REQUEST_FLAG_SESSION_KEY,
        stream_id,
        payload_len,
        credit,
        0,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Direction, FrameDecoder};

    fn frame(key: &[u8], prompt: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_request_with_session(&mut out, 5, 9, &Params::default(), key, prompt);
        out
    }

    #[test]
    fn a_keyed_request_round_trips_through_the_decoder() {
        let bytes = frame(b"conv-42", "héllo".as_bytes());
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        let mut input = &bytes[..];
        let f = d.next(&mut input).unwrap().unwrap();
        assert_eq!(f.header.flags(), REQUEST_FLAG_SESSION_KEY);
        assert_eq!((f.header.stream_id(), f.header.arg()), (5, 9));
        let (r, key) = parse_request(f.payload, f.header.flags(), &ParamLimits::default()).unwrap();
        assert_eq!((r.prompt, key), ("héllo", Some("conv-42")));
        assert_eq!(r.params, Params::default());
        // Without the flag the same bytes are a plain request whose prompt
        // starts with the length field (0x07 0x00, valid UTF-8).
        let (plain, none) = parse_request(f.payload, 0, &ParamLimits::default()).unwrap();
        assert_eq!(none, None);
        assert!(plain.prompt.ends_with("conv-42héllo"));
    }

    #[test]
    fn bad_keys_are_400() {
        let l = ParamLimits::default();
        let long = vec![b'k'; SESSION_KEY_BYTES_MAX + 1];
        let max = vec![b'k'; SESSION_KEY_BYTES_MAX];
        assert!(parse_request(&frame(&max, b"p")[HEADER_BYTES..], 1, &l).is_ok());
        for key in [&b""[..], &long, b"has space", b"tab\t", b"\xc3\xa9"] {
            let f = frame(key, b"p");
            assert_eq!(parse_request(&f[HEADER_BYTES..], 1, &l).unwrap_err().0, 400, "{key:?}");
        }
        // Length past the payload's end, and no room for the length.
        let mut f = frame(b"abc", b"");
        let n = f.len();
        f[HEADER_BYTES + PARAMS_BYTES] = 4;
        assert_eq!(parse_request(&f[HEADER_BYTES..n], 1, &l).unwrap_err().0, 400);
        assert_eq!(
            parse_request(&f[HEADER_BYTES..HEADER_BYTES + PARAMS_BYTES + 1], 1, &l)
                .unwrap_err()
                .0,
            400
        );
        // A bad prompt or parameter block is still refused.
        assert!(parse_request(&frame(b"abc", b"\xff")[HEADER_BYTES..], 1, &l).is_err());
        let mut f = frame(b"abc", b"p");
        f[HEADER_BYTES + 28] = 1;
        assert!(parse_request(&f[HEADER_BYTES..], 1, &l).is_err());
    }

    #[test]
    fn undefined_request_flags_stay_a_violation() {
        let mut bytes = frame(b"k", b"p");
        bytes[6] = 0x03;
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        let mut input = &bytes[..];
        assert_eq!(d.next(&mut input).unwrap_err().code, 400);
    }
}
