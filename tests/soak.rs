//! Issue 11, the soak: the counter it found wrong (a CANCEL was in no
//! outcome of `cnse_requests_total`) now counts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::*;

fn metrics_addr(s: &Server) -> SocketAddr {
    let mut addr = None;
    assert!(
        eventually(WAIT, || {
            addr = s
                .output()
                .iter()
                .find_map(|l| l.strip_prefix("metrics listening on "))
                .and_then(|a| a.parse().ok());
            addr.is_some()
        }),
        "no `metrics listening on` line: {:?}",
        s.output()
    );
    addr.unwrap()
}

/// `name`'s value in the server's `/metrics`.
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut c = TcpStream::connect(addr).ok()?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.parse().ok())
}

#[test]
fn issue11_a_cancelled_stream_counts_as_cancelled_in_metrics() {
    let mut args = synthetic(1_000, 5_000);
    args.extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
    let s = Server::start(&strs(&args));
    let m = metrics_addr(&s);
    let mut c = s.client();
    for id in 1..=3u64 {
        c.request(id, 0, &params(10_000), "cancel me").unwrap();
        let first = c.next_frame().unwrap();
        assert_eq!((first.kind, first.stream_id), (Kind::Tokens, id));
        c.cancel(id).unwrap();
        let frames = read_stream(&mut c, id);
        let end = frames.last().unwrap();
        assert_eq!((end.kind, end.arg), (Kind::End, FinishReason::Cancelled as u32));
    }
    let cancelled = "cnse_requests_total{protocol=\"binary\",outcome=\"cancelled\"}";
    // The request metrics reach /metrics on the next timeout sweep (100 ms).
    assert!(
        eventually(WAIT, || metric(m, cancelled) == Some(3.0)),
        "three CANCELs, {cancelled} = {:?}",
        metric(m, cancelled)
    );
    assert_eq!(
        metric(m, "cnse_requests_total{protocol=\"binary\",outcome=\"ok\"}"),
        Some(0.0)
    );
}
