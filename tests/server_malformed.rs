//! Issue 2: every malformed header class gets its ERROR on stream 0 and the
//! connection closes, while another client keeps streaming undisturbed.

mod common;
use common::*;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A client streaming a long generation on its own thread; `finish` checks
/// it got every token in order and its END.
struct Bystander {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<u64>,
}

impl Bystander {
    fn start(s: &Server) -> Bystander {
        let mut c = s.client();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut streams = 0;
            // Streams back to back until told to stop; each must be whole.
            while !st.load(Ordering::Relaxed) || streams == 0 {
                let g = c.generate(1, 0, &params(40), "bystander", |_, _| {}).unwrap();
                assert_eq!((g.tokens, g.end_tokens, g.reason), (40, 40, FinishReason::Length));
                streams += 1;
            }
            streams
        });
        Bystander { stop, handle }
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("the bystander's streams were undisturbed")
    }
}

fn bad_headers() -> Vec<(&'static str, [u8; HEADER_BYTES], u32)> {
    let ping = || header(Kind::Ping, 0, 0, 0);
    let mut v = Vec::new();
    let mut h = ping();
    h[0..4].copy_from_slice(b"CNSF");
    v.push(("bad magic", h, 400));
    let mut h = ping();
    h[0..4].copy_from_slice(b"HTTP");
    v.push(("http request", h, 400));
    let mut h = ping();
    h[4] = 2;
    v.push(("version 2", h, 400));
    let mut h = ping();
    h[4] = 0;
    v.push(("version 0", h, 400));
    let mut h = ping();
    h[5] = 0x06;
    v.push(("unknown kind", h, 400));
    let mut h = ping();
    h[5] = 0x00;
    v.push(("kind 0", h, 400));
    let mut h = ping();
    h[5] = 0x82;
    v.push(("server kind from a client", h, 400));
    let mut h = ping();
    h[6] = 1;
    v.push(("flag bit 0", h, 400));
    let mut h = ping();
    h[7] = 0x80;
    v.push(("flag bit 15", h, 400));
    v.push(("oversized", header(Kind::Ping, 0, (1 << 20) + 1, 0), 413));
    v.push(("oversized request", header(Kind::Request, 1, 2 << 20, 0), 413));
    // Order of the checks: the first failing one gives the code.
    let mut h = header(Kind::Ping, 0, u32::MAX, 0);
    h[6] = 1;
    v.push(("flags before size", h, 400));
    let mut h = header(Kind::Ping, 0, u32::MAX, 0);
    h[0] = 0;
    v.push(("magic before size", h, 400));
    v
}

#[test]
fn issue2_malformed_headers_get_their_code_then_close() {
    let s = Server::start(&strs(&synthetic(0, 1_000)));
    let bystander = Bystander::start(&s);
    for (what, h, code) in bad_headers() {
        let mut c = s.client();
        c.write_raw(&h).unwrap();
        let frames = expect_violation(&mut c, code);
        assert_eq!(frames.len(), 1, "{what}: {frames:?}");
    }
    // Before the handshake too.
    for (what, h, code) in bad_headers() {
        let mut c = s.raw();
        c.write_raw(&h).unwrap();
        let frames = expect_violation(&mut c, code);
        assert_eq!(frames.len(), 1, "{what} as first frame: {frames:?}");
    }
    assert!(bystander.finish() >= 1);
}

#[test]
fn issue2_violation_cancels_open_streams_without_end() {
    let s = Server::start(&strs(&synthetic(0, 1_000)));
    let mut c = s.client();
    c.request(1, 0, &params(10_000), "long").unwrap();
    c.request(2, 0, &params(10_000), "long").unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!(f.kind, Kind::Tokens);
    let mut h = header(Kind::Ping, 0, 0, 0);
    h[4] = 9;
    c.write_raw(&h).unwrap();
    let frames = expect_violation(&mut c, 400);
    assert!(
        frames.iter().all(|f| f.kind != Kind::End),
        "no END for streams of a violating connection: {frames:?}"
    );
    // The server still serves others.
    let g = s.client().generate(1, 0, &params(3), "after", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 3);
}

#[test]
fn issue2_four_gib_payload_len_is_413_without_allocating() {
    let s = Server::start(&[]);
    let bystander = Bystander::start(&s);
    // Let the server reach its steady footprint first.
    s.client().generate(1, 0, &params(8), "warm", |_, _| {}).unwrap();
    let before = s.rss_kib();
    for i in 0..20u64 {
        let mut c = s.client();
        let h = header(Kind::Ping, i, u32::MAX, 0);
        // Some payload bytes after the header, as an attacker would send.
        let mut bytes = h.to_vec();
        bytes.extend_from_slice(&[0xAB; 4096]);
        let _ = c.write_raw(&bytes);
        let frames = expect_violation(&mut c, 413);
        assert_eq!(frames.len(), 1);
    }
    let after = s.rss_kib();
    assert!(
        after < before + 32 * 1024,
        "server RSS grew from {before} KiB to {after} KiB after 4 GiB payload_len headers"
    );
    assert!(bystander.finish() >= 1);
}

#[test]
fn issue2_payload_limit_is_configurable() {
    let s = Server::start(&["--payload-max-bytes", "1000"]);
    let mut c = s.raw();
    let ack = c.hello(b"").unwrap();
    assert_eq!(ack.payload_bytes_max, 1000);
    c.ping(0, 0, 0, &[1u8; 1000]).unwrap();
    assert_eq!(c.next_frame().unwrap().kind, Kind::Pong);
    c.ping(0, 0, 0, &[1u8; 1001]).unwrap();
    expect_violation(&mut c, 413);
}

#[test]
fn issue2_garbage_and_half_frames_never_crash_the_server() {
    let mut s = Server::start(&[]);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..50 {
        let mut c = s.raw();
        let mut junk = vec![0u8; 1 + (round * 37) % 300];
        for b in junk.iter_mut() {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            *b = rng as u8;
        }
        let _ = c.write_raw(&junk);
        // Either a violation or (for < 32 bytes) a wait; drop the client.
        let _ = c.next_frame_within(Duration::from_millis(20));
    }
    // A header cut short, then the client leaves.
    let mut c = s.client();
    c.write_raw(&header(Kind::Ping, 0, 100, 0)[..20]).unwrap();
    drop(c);
    assert!(s.alive(), "server survived");
    let g = s.client().generate(1, 0, &params(2), "still here", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 2);
}
