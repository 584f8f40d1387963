//! A stream's tokens reach the client by one of two paths: framed straight
//! into the connection's output as the backend delivers them (nothing
//! queued before them, credit for all, room in the send), or through the
//! stream's queue and the flush (credit short, send buffer full). Streams
//! of both kinds share a connection and a send; each stream's frames stay
//! in order, within its credit, and its text is whole.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::synthetic::{expected_text, SyntheticConfig, SyntheticFactory};
use cnse_backend::{BackendFactory, Params};
use cnse_proto::{put_credit, put_hello, put_request, Direction, FrameDecoder, Kind, PAYLOAD_BYTES_MAX_DEFAULT};
use cnse_server::session::Session;
use cnse_server::transport::NoteIo;
use cnse_server::Config;

const PROMPT: &str = "Write a haiku about the sea.";

/// A session with one connection past its handshake.
fn one_connection(cfg: Config) -> (Session<NoteIo>, u32, Instant) {
    let now = Instant::now();
    let backend = SyntheticFactory::new(SyntheticConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        ..SyntheticConfig::default()
    })
    .build(0)
    .unwrap();
    let mut session = Session::new(Arc::new(cfg), backend, NoteIo::new(now, true), now, 4, 0);
    let mut hello = Vec::new();
    put_hello(&mut hello, b"");
    session.begin_turn(now);
    let slot = session.on_accept(100 as RawFd).unwrap();
    session.on_input(slot, 0, &hello);
    session.end_turn();
    complete_sends(&mut session);
    (session, slot, now)
}

/// Completes every send in full; returns their bytes in order.
fn complete_sends(session: &mut Session<NoteIo>) -> Vec<u8> {
    let mut bytes = Vec::new();
    for sent in std::mem::take(&mut session.io_mut().sends) {
        session.on_send_done(sent.conn.slot, sent.conn.gen, sent.len as i32);
        bytes.extend_from_slice(&sent.bytes);
    }
    bytes
}

/// One turn at `now` that brings `input` (if any) to the connection.
fn turn(session: &mut Session<NoteIo>, slot: u32, now: Instant, input: &[u8]) -> Vec<u8> {
    session.io_mut().now = now;
    session.begin_turn(now);
    if !input.is_empty() {
        session.on_input(slot, 0, input);
    }
    session.end_turn();
    complete_sends(session)
}

/// What a client keeps per stream: text, tokens, ENDs, and whether every
/// TOKENS frame's first index followed the one before.
#[derive(Default, Clone)]
struct Seen {
    text: Vec<u8>,
    tokens: u64,
    ends: u32,
    in_order: bool,
}

fn read(out: &[u8], seen: &mut [Seen]) {
    let mut d = FrameDecoder::new(Direction::ToClient, PAYLOAD_BYTES_MAX_DEFAULT);
    let mut input = out;
    while let Some(f) = d.next(&mut input).unwrap() {
        let s = &mut seen[f.header.stream_id() as usize];
        match f.kind {
            Kind::Tokens => {
                assert_eq!(s.ends, 0, "no TOKENS after END");
                s.in_order &= f.header.aux() == s.tokens;
                s.tokens += u64::from(f.header.arg());
                s.text.extend_from_slice(f.payload);
            }
            Kind::End => s.ends += 1,
            k => panic!("unexpected {k:?}"),
        }
    }
}

fn requests(credits: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, &credit) in credits.iter().enumerate() {
        let id = i as u64 + 1;
        let p = Params {
            max_tokens: 16,
            seed: id,
            ..Params::default()
        };
        put_request(&mut out, id, credit, &p, PROMPT.as_bytes());
    }
    out
}

#[test]
fn streams_with_and_without_credit_share_a_send_each_within_its_credit() {
    let (mut session, slot, now) = one_connection(Config::default());
    // Streams 1 and 3 unlimited, stream 2 with credit for 5 of its 16.
    let out = turn(
        &mut session,
        slot,
        now + Duration::from_millis(1),
        &requests(&[0, 5, 0]),
    );
    let mut seen = vec![
        Seen {
            in_order: true,
            ..Seen::default()
        };
        4
    ];
    read(&out, &mut seen);
    for id in [1, 3] {
        assert_eq!(
            (seen[id].tokens, seen[id].ends),
            (16, 1),
            "stream {id} whole in the first send"
        );
    }
    assert_eq!((seen[2].tokens, seen[2].ends), (5, 0), "stream 2 stops at its credit");

    let mut credit = Vec::new();
    put_credit(&mut credit, 2, 20);
    let out = turn(&mut session, slot, now + Duration::from_millis(2), &credit);
    read(&out, &mut seen);
    for (id, s) in seen.iter().enumerate().skip(1) {
        assert_eq!((s.tokens, s.ends, s.in_order), (16, 1, true), "stream {id}");
        assert_eq!(s.text, expected_text(PROMPT, id as u64, 16), "stream {id}");
    }
    assert_eq!(session.counters().streams_open, 0);
}

#[test]
fn streams_past_a_full_send_buffer_wait_in_their_queues_and_arrive_whole() {
    // Room for a few streams' frames per send: the rest are queued and
    // framed by later flushes, as the sends complete.
    let cfg = Config {
        send_buffer_bytes: 1024,
        ..Config::default()
    };
    let (mut session, slot, now) = one_connection(cfg);
    let streams = 12;
    let mut seen = vec![
        Seen {
            in_order: true,
            ..Seen::default()
        };
        streams + 1
    ];
    let mut input = requests(&vec![0; streams]);
    let mut sends = 0;
    for i in 1..=50 {
        let out = turn(&mut session, slot, now + Duration::from_millis(i), &input);
        input.clear();
        if !out.is_empty() {
            sends += 1;
            assert!(
                out.len() <= 1024 + 512,
                "a send stays near the buffer's size: {}",
                out.len()
            );
        }
        read(&out, &mut seen);
        if session.counters().streams_open == 0 {
            break;
        }
    }
    assert!(sends > 1, "the streams needed more than one send");
    for (id, s) in seen.iter().enumerate().skip(1) {
        assert_eq!((s.tokens, s.ends, s.in_order), (16, 1, true), "stream {id}");
        assert_eq!(s.text, expected_text(PROMPT, id as u64, 16), "stream {id}");
    }
}
