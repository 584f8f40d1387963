//! The protocol core of the peer servers in `benches/` (issue 13): the
//! frames they answer, credit, and the text, which must be the bytes
//! cnse-dp's zero-delay synthetic backend sends for the same request.

#[path = "../benches/peer/session.rs"]
#[allow(dead_code)]
mod session;

use std::time::Instant;

use cnse_backend::synthetic::expected_text;
use cnse_proto::*;
use session::{Session, Verdict};

fn frames(bytes: &[u8]) -> Vec<(Kind, u64, u32, u64, Vec<u8>)> {
    let mut d = FrameDecoder::new(Direction::ToClient, 1 << 20);
    let mut input = bytes;
    let mut v = Vec::new();
    while let Some(f) = d.next(&mut input).unwrap() {
        v.push((
            f.kind,
            f.header.stream_id(),
            f.header.arg(),
            f.header.aux(),
            f.payload.to_vec(),
        ));
    }
    assert!(input.is_empty());
    v
}

fn request(id: u64, credit: u32, max_tokens: u32, seed: u64, prompt: &str) -> Vec<u8> {
    let p = Params {
        max_tokens,
        seed,
        ..Params::default()
    };
    let mut b = Vec::new();
    put_request(&mut b, id, credit, &p, prompt.as_bytes());
    b
}

#[test]
fn issue13_peer_session_answers_hello_ping_and_requests_within_credit() {
    let mut s = Session::new("peer");
    let mut input = Vec::new();
    put_hello(&mut input, b"");
    put_ping(&mut input, 9, 7, 123, b"echo");
    input.extend_from_slice(&request(1, 4, 10, 42, "the sea"));
    let mut out = Vec::new();
    let now = Instant::now();
    // Any split of the byte stream gives the same answer.
    for piece in input.chunks(5) {
        assert_eq!(s.on_input(piece, now, &mut out), Verdict::Open);
    }
    let f = frames(&out);
    assert_eq!(f[0].0, Kind::HelloAck);
    assert_eq!(
        (f[1].0, f[1].1, f[1].2, f[1].3, &f[1].4[..]),
        (Kind::Pong, 9, 7, 123, &b"echo"[..])
    );
    // Credit 4: one TOKENS frame of 4 tokens, nothing more until CREDIT.
    assert_eq!((f[2].0, f[2].2, f[2].3), (Kind::Tokens, 4, 0));
    assert_eq!(f.len(), 3);
    let mut text = f[2].4.clone();
    out.clear();
    let mut credit = Vec::new();
    put_credit(&mut credit, 1, 4);
    put_credit(&mut credit, 1, 100);
    put_credit(&mut credit, 1, 100); // the stream has ended: ignored
    assert_eq!(s.on_input(&credit, now, &mut out), Verdict::Open);
    let f = frames(&out);
    assert_eq!((f[0].0, f[0].2, f[0].3), (Kind::Tokens, 4, 4));
    assert_eq!((f[1].0, f[1].2, f[1].3), (Kind::Tokens, 2, 8));
    assert_eq!((f[2].0, f[2].2, f[2].3), (Kind::End, FinishReason::Length as u32, 10));
    assert_eq!(f.len(), 3);
    text.extend_from_slice(&f[0].4);
    text.extend_from_slice(&f[1].4);
    assert_eq!(text, expected_text("the sea", 42, 10), "cnse-dp's zero-delay bytes");
}

#[test]
fn issue13_peer_session_sends_unlimited_credit_in_one_frame_like_cnse_zero_delay() {
    let mut s = Session::new("peer");
    let mut input = Vec::new();
    put_hello(&mut input, b"");
    input.extend_from_slice(&request(3, 0, 100, 7, "Write a haiku about the sea."));
    let mut out = Vec::new();
    assert_eq!(s.on_input(&input, Instant::now(), &mut out), Verdict::Open);
    let f = frames(&out);
    assert_eq!(f.len(), 3);
    assert_eq!((f[1].0, f[1].2), (Kind::Tokens, 100));
    assert_eq!(f[1].4, expected_text("Write a haiku about the sea.", 7, 100));
    assert_eq!((f[2].0, f[2].3), (Kind::End, 100));
}

#[test]
fn issue13_peer_session_refuses_what_the_page_refuses() {
    // A first frame other than HELLO: ERROR 400 on stream 0, then close.
    let mut s = Session::new("peer");
    let mut out = Vec::new();
    let mut ping = Vec::new();
    put_ping(&mut ping, 1, 0, 0, b"");
    assert_eq!(s.on_input(&ping, Instant::now(), &mut out), Verdict::Close);
    let f = frames(&out);
    assert_eq!((f[0].0, f[0].1, f[0].2), (Kind::Error, 0, 400));
    // Bad parameters: ERROR on the stream, the connection stays open; an
    // id in use: 409; CANCEL ends a waiting stream with reason 2.
    let mut s = Session::new("peer");
    let mut input = Vec::new();
    put_hello(&mut input, b"");
    input.extend_from_slice(&request(5, 0, 0, 1, "x"));
    input.extend_from_slice(&request(6, 1, 8, 1, "x"));
    input.extend_from_slice(&request(6, 1, 8, 1, "x"));
    put_cancel(&mut input, 6);
    let mut out = Vec::new();
    assert_eq!(s.on_input(&input, Instant::now(), &mut out), Verdict::Open);
    let f = frames(&out);
    let kinds: Vec<(Kind, u64, u32)> = f.iter().map(|x| (x.0, x.1, x.2)).collect();
    assert_eq!(
        kinds,
        [
            (Kind::HelloAck, 0, 0),
            (Kind::Error, 5, 400),
            (Kind::Tokens, 6, 1),
            (Kind::Error, 6, 409),
            (Kind::End, 6, FinishReason::Cancelled as u32),
        ]
    );
}
