//! Frame writers. Each appends one whole frame to `out`; the caller sizes
//! `out` once (capacity) so appending never reallocates in the steady state,
//! and checks room with [`frame_bytes`] first.

use crate::{FinishReason, HeaderMut, Kind, Params, END_PAYLOAD_BYTES, HEADER_BYTES, PARAMS_BYTES};

/// Bytes a frame with `payload_bytes` of payload takes on the wire.
#[inline]
pub const fn frame_bytes(payload_bytes: usize) -> usize {
    HEADER_BYTES + payload_bytes
}

/// Appends a frame whose payload is the concatenation of `parts`.
#[inline]
pub fn put_frame(out: &mut Vec<u8>, kind: Kind, stream_id: u64, arg: u32, aux: u64, parts: &[&[u8]]) {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(payload).expect("payload fits u32: callers bound it by the payload limit");
    // The header is built in registers and goes in with the payload after
    // one capacity check (resizing to write it in place zeroed it first
    // and checked the capacity once per part: half of a TOKENS frame's
    // instructions).
    let mut h = [0u8; HEADER_BYTES];
    HeaderMut::new(&mut h).set(kind, 0, stream_id, len, arg, aux);
    out.reserve(HEADER_BYTES + payload);
    out.extend_from_slice(&h);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// HELLO_ACK: server name and version, and the payload limit in `aux`.
pub fn put_hello_ack(out: &mut Vec<u8>, payload_bytes_max: u32, name: &str) {
    put_hello_ack_features(out, 0, payload_bytes_max, name);
}

/// HELLO_ACK granting protocol features in `arg` (`FEATURE_*` bits).
pub fn put_hello_ack_features(out: &mut Vec<u8>, features: u32, payload_bytes_max: u32, name: &str) {
    put_frame(
        out,
        Kind::HelloAck,
        0,
        features,
        u64::from(payload_bytes_max),
        &[name.as_bytes()],
    );
}

/// TOKENS: `count` tokens whose text is `text`, the first being token
/// number `first_index` of the stream.
pub fn put_tokens(out: &mut Vec<u8>, stream_id: u64, count: u32, first_index: u64, text: &[u8]) {
    debug_assert!(count >= 1);
    put_frame(out, Kind::Tokens, stream_id, count, first_index, &[text]);
}

/// END with the server-measured time to first token and total time.
pub fn put_end(
    out: &mut Vec<u8>,
    stream_id: u64,
    reason: FinishReason,
    total_tokens: u64,
    ttft_us: u64,
    total_us: u64,
) {
    let mut p = [0u8; END_PAYLOAD_BYTES];
    p[..8].copy_from_slice(&ttft_us.to_le_bytes());
    p[8..].copy_from_slice(&total_us.to_le_bytes());
    put_frame(out, Kind::End, stream_id, reason as u32, total_tokens, &[&p]);
}

/// Sets the flags of the frame that starts at `out[at..]` (written by one
/// of the `put_*` functions): END's [`crate::END_FLAG_FAILED_OVER`].
pub fn set_flags(out: &mut [u8], at: usize, flags: u16) {
    out[at + 6..at + 8].copy_from_slice(&flags.to_le_bytes());
}

/// ERROR with a human-readable message.
pub fn put_error(out: &mut Vec<u8>, stream_id: u64, code: u32, message: &str) {
    put_frame(out, Kind::Error, stream_id, code, 0, &[message.as_bytes()]);
}

/// PONG echoing a PING's stream, arg, aux and payload.
pub fn put_pong(out: &mut Vec<u8>, stream_id: u64, arg: u32, aux: u64, payload: &[u8]) {
    put_frame(out, Kind::Pong, stream_id, arg, aux, &[payload]);
}

/// Client side: HELLO with an optional auth token.
pub fn put_hello(out: &mut Vec<u8>, token: &[u8]) {
    put_hello_features(out, token, 0);
}

/// Client side: HELLO asking for protocol features (`FEATURE_*` bits).
pub fn put_hello_features(out: &mut Vec<u8>, token: &[u8], features: u32) {
    put_frame(out, Kind::Hello, 0, features, 0, &[token]);
}

/// Client side: REQUEST with parameters, prompt and initial credit (0 =
/// unlimited).
pub fn put_request(out: &mut Vec<u8>, stream_id: u64, credit: u32, params: &Params, prompt: &[u8]) {
    let block: [u8; PARAMS_BYTES] = params.encode();
    put_frame(out, Kind::Request, stream_id, credit, 0, &[&block, prompt]);
}

/// Client side: CANCEL.
pub fn put_cancel(out: &mut Vec<u8>, stream_id: u64) {
    put_frame(out, Kind::Cancel, stream_id, 0, 0, &[]);
}

/// Client side: CREDIT granting `tokens` more.
pub fn put_credit(out: &mut Vec<u8>, stream_id: u64, tokens: u32) {
    put_frame(out, Kind::Credit, stream_id, tokens, 0, &[]);
}

/// Client side: PING.
pub fn put_ping(out: &mut Vec<u8>, stream_id: u64, arg: u32, aux: u64, payload: &[u8]) {
    put_frame(out, Kind::Ping, stream_id, arg, aux, &[payload]);
}

/// Decodes an END payload into (ttft_us, total_us).
pub fn end_times(payload: &[u8]) -> Option<(u64, u64)> {
    let p: &[u8; END_PAYLOAD_BYTES] = payload.get(..END_PAYLOAD_BYTES)?.try_into().ok()?;
    Some((
        u64::from_le_bytes(p[..8].try_into().ok()?),
        u64::from_le_bytes(p[8..].try_into().ok()?),
    ))
}
