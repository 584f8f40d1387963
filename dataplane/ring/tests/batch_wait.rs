//! Batched waiting (`RingConfig::batch_wait`): completions that come in
//! during a turn's window leave in that one turn, and a window with nothing
//! in it does not end an idle wait.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cnse_ring::{opcode, types, Ring, RingConfig, RingError, Tag};

const READ: u8 = 1;

fn batched(window: Duration) -> Option<Ring> {
    match Ring::new(RingConfig {
        batch_wait: window,
        ..RingConfig::default()
    }) {
        Ok(r) => Some(r),
        Err(RingError { source, .. }) if source.kind() == std::io::ErrorKind::Unsupported => {
            eprintln!("SKIP: this kernel has no batched waiting ({source})");
            None
        }
        Err(e) => panic!("ring: {e}"),
    }
}

#[test]
fn receives_that_come_in_during_the_window_leave_in_one_turn() {
    const N: usize = 8;
    let Some(mut ring) = batched(Duration::from_millis(500)) else {
        return;
    };
    let pairs: Vec<_> = (0..N).map(|_| UnixStream::pair().unwrap()).collect();
    let mut bufs = [[0u8; 8]; N];
    for (i, ((a, _), buf)) in pairs.iter().zip(bufs.iter_mut()).enumerate() {
        let e = opcode::Recv::new(types::Fd(a.as_raw_fd()), buf.as_mut_ptr(), 8).build();
        // SAFETY: bufs and sockets outlive the ops (all reaped below).
        unsafe { ring.push(e, Tag::slot(READ, i as u32, 0)).unwrap() };
    }
    let mut out = Vec::new();
    ring.turn(Some(Duration::ZERO), &mut out).unwrap();
    assert!(out.is_empty());
    let writers: Vec<UnixStream> = pairs.iter().map(|(_, b)| b.try_clone().unwrap()).collect();
    // One write a millisecond, the first after the turn below began to wait.
    let t = std::thread::spawn(move || {
        for mut w in writers {
            std::thread::sleep(Duration::from_millis(1));
            w.write_all(b"x").unwrap();
        }
    });
    ring.turn(Some(Duration::from_secs(10)), &mut out).unwrap();
    t.join().unwrap();
    assert_eq!(out.len(), N, "every receive of the window in one turn: {out:?}");
    assert_eq!(ring.in_flight(), 0);
}

#[test]
fn an_idle_batched_turn_still_waits_for_its_deadline() {
    let Some(mut ring) = batched(Duration::from_millis(5)) else {
        return;
    };
    let mut out = Vec::new();
    let start = Instant::now();
    ring.turn(Some(Duration::from_millis(200)), &mut out).unwrap();
    let waited = start.elapsed();
    assert!(out.is_empty());
    assert!(
        waited >= Duration::from_millis(180),
        "an empty window ended the wait after {waited:?}"
    );
}

#[test]
fn a_completion_after_the_window_ends_an_idle_wait() {
    let Some(mut ring) = batched(Duration::from_millis(5)) else {
        return;
    };
    let (a, b) = UnixStream::pair().unwrap();
    let mut buf = [0u8; 8];
    let e = opcode::Recv::new(types::Fd(a.as_raw_fd()), buf.as_mut_ptr(), 8).build();
    // SAFETY: buf and the socket outlive the op (reaped below).
    unsafe { ring.push(e, Tag::slot(READ, 0, 0)).unwrap() };
    let mut w = b.try_clone().unwrap();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        w.write_all(b"late").unwrap();
    });
    let mut out = Vec::new();
    let start = Instant::now();
    ring.turn(Some(Duration::from_secs(30)), &mut out).unwrap();
    t.join().unwrap();
    assert_eq!(out.len(), 1, "the late receive ends the wait");
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "waited for the deadline, not the receive"
    );
    assert_eq!(&buf[..4], b"late");
}
