//! Clients that send without reading: their output backs up, the server
//! stops reading them (bounded backlog, then TCP backpressure), and every
//! other client keeps full service. Receive buffers are never held by a
//! backed-up connection, so even many such clients cannot starve the ring.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use cnse_proto::{put_ping, Kind};
use common::*;

#[test]
fn issue2_clients_that_never_read_do_not_starve_the_others() {
    let s = Server::start(&["--threads", "1"]);
    let rss_before = s.rss_kib();
    // 128 connections each push PINGs of 256 KiB without ever reading the
    // PONGs: 32 MiB of echo each, far more than socket buffers hold.
    let mut ping = Vec::new();
    put_ping(&mut ping, 0, 0, 0, &vec![7u8; 256 * 1024]);
    let mut hogs = Vec::new();
    for _ in 0..128 {
        let stream = s.client().into_stream().unwrap();
        stream.set_nonblocking(true).unwrap();
        hogs.push(stream);
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut blocked = 0;
    for h in &mut hogs {
        let mut sent = 0usize;
        while sent < 32 << 20 && Instant::now() < deadline {
            match h.write(&ping) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    blocked += 1;
                    break;
                }
                Err(e) => panic!("write: {e}"),
            }
        }
    }
    assert!(
        blocked > 100,
        "the server pushed back on the writers ({blocked} of 128 blocked)"
    );
    // Everyone else is served at once.
    let t = Instant::now();
    for id in 1..=20u64 {
        let mut c = s.client();
        let g = c.generate(id, 0, &params(16), "not starved", |_, _| {}).unwrap();
        assert_eq!(g.tokens, 16);
        c.ping(0, 1, 2, b"hi").unwrap();
        assert_eq!(c.next_frame().unwrap().kind, Kind::Pong);
    }
    assert!(t.elapsed() < Duration::from_secs(5), "service took {:?}", t.elapsed());
    // Bounded: per connection at most its two output buffers and the
    // input backlog, whatever the client sent.
    let grown_kib = s.rss_kib().saturating_sub(rss_before);
    assert!(
        grown_kib < 128 * 2 * 1024,
        "server grew by {grown_kib} KiB for 128 stalled clients"
    );
    drop(hogs);
}
