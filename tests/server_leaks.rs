//! Issue 9's leak and bound regressions, against the real binary: whatever
//! clients do, once they are gone the server's connections and descriptors
//! return to where they were, and new clients are served.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use cnse_proto::{put_hello, put_ping};
use common::fault::{open_fds, reset};
use common::*;

#[test]
fn issue9_backed_up_clients_that_close_or_reset_give_back_their_slots_and_fds() {
    raise_nofile(4096);
    let s = Server::start(&["--threads", "1", "--max-connections", "32"]);
    let baseline = open_fds(s.pid());
    let mut hello = Vec::new();
    put_hello(&mut hello, b"");
    let mut ping = Vec::new();
    put_ping(&mut ping, 0, 0, 0, &vec![7u8; 256 * 1024]);
    for round in 0..2 {
        // 128 clients that never read push large PINGs until the server
        // stops taking them (32 get a slot, the rest are refused).
        let mut hogs = Vec::new();
        for _ in 0..128 {
            let mut c = TcpStream::connect(s.addr).unwrap();
            c.write_all(&hello).unwrap();
            c.set_nonblocking(true).unwrap();
            hogs.push(c);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for h in &mut hogs {
            let mut sent = 0usize;
            while sent < 8 << 20 && Instant::now() < deadline {
                match h.write(&ping[sent % ping.len()..]) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
        }
        // Then they go: half close with unread input (the kernel resets),
        // half reset outright.
        for (i, h) in hogs.into_iter().enumerate() {
            if (i + round) % 2 == 0 {
                drop(h);
            } else {
                reset(h);
            }
        }
        let back = eventually(Duration::from_secs(1), || open_fds(s.pid()) <= baseline);
        assert!(
            back,
            "round {round}: {} descriptors open 1 s after every client left, {baseline} before",
            open_fds(s.pid())
        );
        // Every slot is free again: 32 new clients are all served.
        let clients: Vec<_> = (0..32).map(|_| s.client()).collect();
        drop(clients);
        assert!(eventually(Duration::from_secs(1), || open_fds(s.pid()) <= baseline));
    }
}

#[test]
fn issue9_a_stream_whose_client_grants_no_credit_ends_with_504_and_frees_the_backend() {
    let mut args = vec!["--stream-stall-timeout-ms", "300", "--stats-interval-ms", "50"];
    let pace = synthetic(1_000, 1_000);
    args.extend(strs(&pace));
    let s = Server::start(&args);
    let mut c = s.client();
    // One token of credit, never more: the backend produces into the
    // stream's bounded queue and pauses; the stream is stuck.
    c.request(1, 1, &params(1_000), "stall me").unwrap();
    let start = Instant::now();
    let mut tokens = 0u64;
    let end = loop {
        let f = c.next_frame_within(Duration::from_secs(5)).expect("a frame within 5 s");
        match f.kind {
            cnse_proto::Kind::Tokens => tokens += u64::from(f.arg),
            _ => break f,
        }
    };
    assert_eq!(
        end.kind,
        cnse_proto::Kind::Error,
        "stream 1 ends with ERROR, got {:?}",
        end.kind
    );
    assert_eq!(end.arg, cnse_proto::code::BACKEND_TIMEOUT);
    assert_eq!(tokens, 1, "no token beyond the one of credit");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "ended after {waited:?}, before the stall timeout"
    );
    // The backend's work for it is gone, and the connection still serves.
    assert!(
        eventually(Duration::from_secs(2), || s.stat("active") == Some(0)),
        "backend still holds work: {:?}",
        s.stat("active")
    );
    let g = c.generate(2, 0, &params(8), "still served", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 8);
}

#[test]
fn a_finished_stream_whose_last_tokens_get_no_credit_ends_with_504_and_frees_its_slot() {
    let mut args = vec!["--stream-stall-timeout-ms", "300", "--stats-interval-ms", "50"];
    let pace = synthetic(0, 0);
    args.extend(strs(&pace));
    let s = Server::start(&args);
    let mut c = s.client();
    // A short answer the zero-delay backend finishes at once: 19 of its 20
    // tokens wait for credit that never comes, with no backend work left
    // to time out.
    c.request(1, 1, &params(20), "finish, then stall").unwrap();
    let start = Instant::now();
    let first = c.next_frame_within(Duration::from_secs(5)).expect("the first token");
    assert_eq!((first.kind, first.arg), (cnse_proto::Kind::Tokens, 1));
    let end = c.next_frame_within(Duration::from_secs(5)).expect("a frame within 5 s");
    assert_eq!(
        (end.kind, end.arg),
        (cnse_proto::Kind::Error, cnse_proto::code::BACKEND_TIMEOUT),
        "the held tokens are dropped with ERROR 504: {:?}",
        end.kind
    );
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "ended before the stall timeout"
    );
    assert!(
        eventually(Duration::from_secs(2), || s.stat("streams") == Some(0)),
        "the stream still holds its slot: {:?}",
        s.stat("streams")
    );
    let g = c.generate(2, 0, &params(8), "still served", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 8);
}

#[test]
fn issue9_a_client_that_does_not_read_has_its_stalled_stream_ended_and_backend_freed() {
    let mut args = vec!["--stream-stall-timeout-ms", "300", "--stats-interval-ms", "50"];
    let pace = synthetic(0, 0);
    args.extend(strs(&pace));
    let s = Server::start(&args);
    let mut c = s.client();
    // Unlimited credit, 64 long generations (about 20 MiB of frames, more
    // than loopback socket buffers hold), and the client never reads: the
    // socket fills, output backs up, the backend pauses.
    for id in 1..=64 {
        c.request(id, 0, &params(65_536), "never read").unwrap();
    }
    assert!(
        eventually(Duration::from_secs(3), || s.stat("active").unwrap_or(0) > 0),
        "the requests did not start"
    );
    assert!(
        eventually(Duration::from_secs(5), || s.stat("active") == Some(0)),
        "the stalled stream still holds backend work: {:?}",
        s.stat("active")
    );
}

/// (kind, arg) of every frame up to the first END or ERROR.
fn read_frames_until_end(c: &mut TcpStream) -> Vec<(cnse_proto::Kind, u32)> {
    use std::io::Read;
    let mut d = cnse_proto::FrameDecoder::new(cnse_proto::Direction::ToClient, 1 << 20);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = c.read(&mut buf).expect("reading the answer");
        assert!(n > 0, "closed before END or ERROR: {out:?}");
        let mut input = &buf[..n];
        while let Some(f) = d.next(&mut input).unwrap() {
            out.push((f.kind, f.header.arg()));
            if matches!(f.kind, cnse_proto::Kind::End | cnse_proto::Kind::Error) {
                return out;
            }
        }
    }
}

#[test]
fn issue9_two_thousand_connections_with_maximum_prompts_stay_within_the_memory_budget() {
    raise_nofile(8192);
    let budget_mib = 64u64;
    let mut args = vec!["--memory-budget-mib", "64", "--max-connections", "4096"];
    let pace = synthetic(0, 0);
    args.extend(strs(&pace));
    let s = Server::start(&args);
    let baseline_kib = s.rss_kib();
    // Every connection is left in the middle of a maximum-size REQUEST
    // (1 MiB payload) before any of them finishes: without a budget the
    // server would stage 2,000 × 1 MiB.
    let mut frame = Vec::new();
    let prompt = vec![b'p'; (1 << 20) - cnse_proto::PARAMS_BYTES];
    cnse_proto::put_request(&mut frame, 1, 0, &params(4), &prompt);
    let half = frame.len() / 2;
    let mut hello = Vec::new();
    put_hello(&mut hello, b"");
    let mut conns = Vec::new();
    let mut peak_kib = baseline_kib;
    for i in 0..2_000 {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(&hello).unwrap();
        c.write_all(&frame[..half]).unwrap();
        conns.push(c);
        if i % 100 == 0 {
            peak_kib = peak_kib.max(s.rss_kib());
        }
    }
    for c in &mut conns {
        c.write_all(&frame[half..]).unwrap();
    }
    peak_kib = peak_kib.max(s.rss_kib());
    // Each one is answered: served (END) or refused for memory (ERROR 429).
    let (mut served, mut refused) = (0, 0);
    for (i, mut c) in conns.into_iter().enumerate() {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let kinds = read_frames_until_end(&mut c);
        assert_eq!(kinds.first().map(|k| k.0), Some(cnse_proto::Kind::HelloAck));
        match kinds.last().copied() {
            Some((cnse_proto::Kind::End, _)) => served += 1,
            Some((cnse_proto::Kind::Error, cnse_proto::code::OVERLOADED)) => refused += 1,
            other => panic!("connection {i}: unexpected answer {other:?}"),
        }
        if i % 200 == 0 {
            peak_kib = peak_kib.max(s.rss_kib());
        }
    }
    let grown_mib = peak_kib.saturating_sub(baseline_kib) / 1024;
    assert!(
        grown_mib <= budget_mib,
        "RSS grew by {grown_mib} MiB over a {budget_mib} MiB budget ({served} served, {refused} refused)"
    );
    eprintln!("{served} served, {refused} refused, RSS grew {grown_mib} MiB");
    assert!(served > 0 && refused > 0, "{served} served, {refused} refused");
    // And it keeps serving.
    let mut c = s.client();
    let g = c.generate(1, 0, &params(8), "after the flood", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 8);
}
