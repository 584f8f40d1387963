//! Issue 9's leak and bound regressions, against the real binary: whatever
//! clients do, once they are gone the server's connections and descriptors
//! return to where they were, and new clients are served.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use cnse_proto::{put_hello, put_ping};
use common::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Closes with SO_LINGER 0: the peer sees a reset, whatever is unread.
fn reset(s: TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads a valid linger struct of the given size on
    // an open socket.
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

/// The `active=` work count of the server's latest stats line.
fn backend_active(s: &Server) -> Option<u64> {
    s.output()
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("stats "))
        .and_then(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("active=")))
        .and_then(|v| v.parse().ok())
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
    assert_eq!(end.kind, cnse_proto::Kind::Error, "stream 1 ends with ERROR, got {:?}", end.kind);
    assert_eq!(end.arg, cnse_proto::code::BACKEND_TIMEOUT);
    assert_eq!(tokens, 1, "no token beyond the one of credit");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300), "ended after {waited:?}, before the stall timeout");
    // The backend's work for it is gone, and the connection still serves.
    assert!(
        eventually(Duration::from_secs(2), || backend_active(&s) == Some(0)),
        "backend still holds work: {:?}",
        backend_active(&s)
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
        eventually(Duration::from_secs(3), || backend_active(&s).unwrap_or(0) > 0),
        "the requests did not start"
    );
    assert!(
        eventually(Duration::from_secs(5), || backend_active(&s) == Some(0)),
        "the stalled stream still holds backend work: {:?}",
        backend_active(&s)
    );
}
