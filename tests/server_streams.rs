//! Issue 2: streams on one connection — interleaving, credit, cancel,
//! duplicate ids, bad parameters, PING echo, END timings.

mod common;
use common::*;

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A quick synthetic model: 2 ms to the first token, 1 ms per token.
fn quick() -> Server {
    Server::start(&strs(&synthetic(2_000, 1_000)))
}

#[test]
fn issue2_one_stream_end_to_end() {
    let s = quick();
    let mut c = s.client();
    let mut frames = 0;
    let g = c
        .generate(1, 0, &params(16), "tell me a story", |_, _| frames += 1)
        .unwrap();
    assert_eq!(g.tokens, 16);
    assert_eq!(g.end_tokens, 16, "END aux is the stream's total");
    assert_eq!(g.reason, FinishReason::Length);
    assert!(std::str::from_utf8(&g.text).is_ok(), "the stream's text is UTF-8");
    assert!(frames >= 1);
    // Deterministic from (prompt, seed).
    let again = c.generate(1, 0, &params(16), "tell me a story", |_, _| {}).unwrap();
    assert_eq!(
        again.text, g.text,
        "same prompt and seed, same text (stream id reused after END)"
    );
    let other = c
        .generate(3, 0, &Params { seed: 7, ..params(16) }, "tell me a story", |_, _| {})
        .unwrap();
    assert_ne!(other.text, g.text, "another seed, another text");
}

#[test]
fn issue2_end_payload_times_are_sane() {
    let s = Server::start(&strs(&synthetic(20_000, 2_000)));
    let mut c = s.client();
    let g = c.generate(5, 0, &params(10), "timing", |_, _| {}).unwrap();
    let client_ttft = g.client_ttft.unwrap();
    assert!(
        g.server_ttft_us >= 20_000,
        "server TTFT {} µs < configured 20 ms",
        g.server_ttft_us
    );
    assert!(g.server_ttft_us <= g.server_total_us);
    // 10 tokens, 9 gaps of 2 ms after the first.
    assert!(g.server_total_us >= 20_000 + 9 * 2_000, "{}", g.server_total_us);
    assert!(Duration::from_micros(g.server_ttft_us) <= client_ttft + Duration::from_millis(1));
    assert!(Duration::from_micros(g.server_total_us) <= g.client_total + Duration::from_millis(1));
    assert!(g.server_total_us < 5_000_000, "{}", g.server_total_us);
}

#[test]
fn issue2_many_streams_interleaved_on_one_connection() {
    let s = quick();
    let mut c = s.client();
    // The reference texts, one stream at a time.
    let streams = 32u64;
    let mut want = HashMap::new();
    for id in 1..=streams {
        let p = Params { seed: id, ..params(24) };
        want.insert(id, c.generate(id, 0, &p, "interleave", |_, _| {}).unwrap().text);
    }
    // All at once: frames of different streams interleave, each stream's
    // frames stay in order and its text is the same.
    for id in 1..=streams {
        let p = Params { seed: id, ..params(24) };
        c.request(100 + id, 0, &p, "interleave").unwrap();
    }
    let mut text: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut next_index: HashMap<u64, u64> = HashMap::new();
    let mut ended = 0;
    let mut order = Vec::new();
    while ended < streams {
        let f = c.next_frame().unwrap();
        let id = f.stream_id - 100;
        assert!((1..=streams).contains(&id), "{f:?}");
        order.push(id);
        match f.kind {
            Kind::Tokens => {
                let n = next_index.entry(id).or_default();
                assert_eq!(f.aux, *n, "token index continues the stream");
                *n += u64::from(f.arg);
                text.entry(id).or_default().extend_from_slice(&f.payload);
            }
            Kind::End => {
                assert_eq!(f.aux, 24);
                assert_eq!(next_index[&id], 24);
                ended += 1;
            }
            _ => panic!("{f:?}"),
        }
    }
    for id in 1..=streams {
        assert_eq!(text[&id], want[&id], "stream {id}");
    }
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(switches > streams as usize, "streams interleave: {switches} switches");
}

#[test]
fn issue2_credit_counts_tokens() {
    let s = Server::start(&strs(&synthetic(0, 200)));
    let mut c = s.client();
    c.request(9, 3, &params(12), "credit").unwrap();
    let mut granted = 3u64;
    let mut got = 0u64;
    let take = |c: &mut Client, granted: u64, got: &mut u64| {
        while *got < granted.min(12) {
            let f = c.next_frame().unwrap();
            assert_eq!((f.kind, f.stream_id), (Kind::Tokens, 9), "{f:?}");
            assert!(f.arg >= 1);
            *got += u64::from(f.arg);
            assert!(*got <= granted, "sum of TOKENS arg {} exceeds credit {granted}", *got);
        }
    };
    take(&mut c, granted, &mut got);
    assert_eq!(got, 3);
    // No credit left: nothing more arrives, however long we wait.
    match c.next_frame_within(Duration::from_millis(300)) {
        Err(ClientError::Timeout { .. }) => {}
        other => panic!("frame beyond credit: {other:?}"),
    }
    c.credit(9, 4).unwrap();
    granted += 4;
    take(&mut c, granted, &mut got);
    assert_eq!(got, 7);
    match c.next_frame_within(Duration::from_millis(300)) {
        Err(ClientError::Timeout { .. }) => {}
        other => panic!("frame beyond credit: {other:?}"),
    }
    c.credit(9, 100).unwrap();
    let rest = read_stream(&mut c, 9);
    let total = got + token_count(&rest);
    assert_eq!(total, 12);
    let end = rest.last().unwrap();
    assert_eq!((end.kind, end.arg, end.aux), (Kind::End, 0, 12));
}

#[test]
fn issue2_credit_of_one_token_at_a_time() {
    let s = Server::start(&strs(&synthetic(0, 0)));
    let mut c = s.client();
    c.request(1, 1, &params(5), "drip").unwrap();
    for i in 0..5u64 {
        let f = c.next_frame().unwrap();
        assert_eq!((f.kind, f.arg, f.aux), (Kind::Tokens, 1, i), "{f:?}");
        if i < 4 {
            match c.next_frame_within(Duration::from_millis(100)) {
                Err(ClientError::Timeout { .. }) => {}
                other => panic!("token {} arrived without credit: {other:?}", i + 1),
            }
        }
        c.credit(1, 1).unwrap();
    }
    let f = c.next_frame().unwrap();
    assert_eq!((f.kind, f.aux), (Kind::End, 5));
}

#[test]
fn issue2_cancel_ends_with_reason_2() {
    let s = Server::start(&strs(&synthetic(0, 2_000)));
    let mut c = s.client();
    c.request(4, 0, &params(60_000), "long").unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!(f.kind, Kind::Tokens);
    let t = Instant::now();
    c.cancel(4).unwrap();
    let rest = read_stream(&mut c, 4);
    let end = rest.last().unwrap();
    assert_eq!((end.kind, end.arg), (Kind::End, 2), "{end:?}");
    let sent = u64::from(f.arg) + token_count(&rest);
    assert_eq!(end.aux, sent, "END total counts what was sent");
    assert!(t.elapsed() < Duration::from_secs(2));
    // CANCEL and CREDIT for a stream that is not open are ignored.
    c.cancel(4).unwrap();
    c.credit(4, 10).unwrap();
    c.cancel(12345).unwrap();
    let g = c.generate(4, 0, &params(3), "after", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 3);
}

#[test]
fn issue2_cancel_while_paused_for_credit() {
    let s = Server::start(&strs(&synthetic(0, 0)));
    let mut c = s.client();
    c.request(2, 2, &params(1000), "paused").unwrap();
    let mut got = 0;
    while got < 2 {
        got += c.next_frame().unwrap().arg;
    }
    c.cancel(2).unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!((f.kind, f.stream_id, f.arg, f.aux), (Kind::End, 2, 2, 2), "{f:?}");
}

#[test]
fn issue2_duplicate_stream_id_is_409_and_original_unaffected() {
    let s = Server::start(&strs(&synthetic(0, 1_000)));
    let mut c = s.client();
    c.request(7, 0, &params(30), "original").unwrap();
    c.request(7, 0, &params(5), "duplicate").unwrap();
    let frames = read_stream_and_errors(&mut c, 7);
    let errors: Vec<_> = frames.iter().filter(|f| f.kind == Kind::Error).collect();
    assert_eq!(errors.len(), 1, "{frames:?}");
    assert_eq!(errors[0].arg, 409);
    let end = frames.iter().find(|f| f.kind == Kind::End).expect("original ends");
    assert_eq!((end.arg, end.aux), (0, 30));
    assert_eq!(token_count(&frames), 30, "the original's tokens, all of them");
    // The original's text is what it would have been alone.
    let alone = c.generate(8, 0, &params(30), "original", |_, _| {}).unwrap();
    let text: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == Kind::Tokens)
        .flat_map(|f| f.payload.clone())
        .collect();
    assert_eq!(text, alone.text);
}

/// Frames of `id` until its END (ERRORs on it along the way included).
fn read_stream_and_errors(c: &mut Client, id: u64) -> Vec<OwnedFrame> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().unwrap();
        assert_eq!(f.stream_id, id, "{f:?}");
        let end = f.kind == Kind::End;
        out.push(f);
        if end {
            return out;
        }
    }
}

#[test]
fn issue2_bad_params_400_on_the_stream_connection_stays_open() {
    let s = quick();
    let mut c = s.client();
    let base = params(4);
    let mut bad: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut payload = |id: u64, p: Params, prompt: &[u8]| {
        let mut v = p.encode().to_vec();
        v.extend_from_slice(prompt);
        bad.push((id, v));
    };
    payload(1, Params { max_tokens: 0, ..base }, b"x");
    payload(
        2,
        Params {
            temperature: -1.0,
            ..base
        },
        b"x",
    );
    payload(
        3,
        Params {
            temperature: f32::NAN,
            ..base
        },
        b"x",
    );
    payload(4, Params { top_p: 0.0, ..base }, b"x");
    payload(5, Params { top_p: 1.5, ..base }, b"x");
    payload(6, base, &[0xff, 0xfe, 0x80]);
    payload(
        7,
        Params {
            max_tokens: u32::MAX,
            ..base
        },
        b"x",
    );
    let mut reserved = base.encode().to_vec();
    reserved[28] = 1;
    bad.push((8, reserved));
    bad.push((9, vec![0u8; 31]));
    for (id, p) in &bad {
        c.request_raw(*id, 0, p).unwrap();
        let f = c.next_frame().unwrap();
        assert_eq!(
            (f.kind, f.stream_id, f.arg),
            (Kind::Error, *id, 400),
            "case {id}: {f:?}"
        );
    }
    // Still open and serving; the rejected ids are free.
    let g = c.generate(1, 0, &base, "fine", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 4);
}

#[test]
fn issue2_request_on_stream_0_is_400_close() {
    let s = quick();
    let mut c = s.client();
    c.request(0, 0, &params(4), "zero").unwrap();
    expect_violation(&mut c, 400);
}

#[test]
fn issue2_ping_echoed_byte_exact() {
    let s = Server::start(&["--payload-max-bytes", "262144"]);
    let mut c = s.client();
    for (i, size) in [0usize, 1, 64, 4096, 65_537, 262_144].into_iter().enumerate() {
        let payload: Vec<u8> = (0..size).map(|j| (j * 131 + i) as u8).collect();
        let id = if i % 2 == 0 { 0 } else { 1 << 60 | i as u64 };
        c.ping(id, 0xdead_0000 + i as u32, u64::MAX - i as u64, &payload)
            .unwrap();
        let f = c.next_frame().unwrap();
        assert_eq!(f.kind, Kind::Pong);
        assert_eq!(
            (f.stream_id, f.arg, f.aux, f.flags),
            (id, 0xdead_0000 + i as u32, u64::MAX - i as u64, 0)
        );
        assert!(f.payload == payload, "payload of {size} bytes echoed exactly");
    }
}

#[test]
fn issue2_ping_while_streaming() {
    let s = Server::start(&strs(&synthetic(0, 1_000)));
    let mut c = s.client();
    c.request(1, 0, &params(50), "busy").unwrap();
    c.ping(1, 5, 6, b"same id as a stream").unwrap();
    let (mut pong, mut end) = (false, false);
    while !(pong && end) {
        let f = c.next_frame().unwrap();
        match f.kind {
            Kind::Pong => {
                assert_eq!(f.payload, b"same id as a stream");
                pong = true;
            }
            Kind::End => end = true,
            Kind::Tokens => {}
            _ => panic!("{f:?}"),
        }
    }
}

#[test]
fn issue2_frames_split_byte_by_byte() {
    let s = quick();
    let mut c = s.client();
    let mut bytes = Vec::new();
    cnse_proto::put_request(&mut bytes, 3, 0, &params(5), "split".as_bytes());
    cnse_proto::put_ping(&mut bytes, 4, 1, 2, b"pp");
    for b in &bytes {
        c.write_raw(std::slice::from_ref(b)).unwrap();
    }
    let mut seen_pong = false;
    let mut seen_end = false;
    while !(seen_pong && seen_end) {
        let f = c.next_frame().unwrap();
        match f.kind {
            Kind::Pong => seen_pong = true,
            Kind::End => {
                assert_eq!(f.aux, 5);
                seen_end = true
            }
            Kind::Tokens => {}
            _ => panic!("{f:?}"),
        }
    }
}
