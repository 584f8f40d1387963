//! The load generator's RESP mode (PING to a redis-compatible server):
//! against an in-test server that answers in pieces and sometimes with an
//! error reply, and against a real redis-server when one is installed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cnse_client::load::{self, LoadConfig, LoadReport, Mode, RESP_ERROR_CODE};

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";

/// How the in-test server answers.
#[derive(Clone, Copy)]
enum Answer {
    /// `+PONG` to every PING, the bytes written one at a time every
    /// seventh answer (answers cut across the client's reads).
    Pong,
    /// Every third PING gets `-ERR ...` instead.
    SomeErrors,
    /// Something that is not an answer to PING.
    Garbage,
}

fn serve_conn(mut s: TcpStream, answer: Answer) {
    s.set_nodelay(true).unwrap();
    let (mut buf, mut pending, mut seen) = (vec![0u8; 65536], Vec::new(), 0u64);
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / PING.len();
        assert!(
            pending.chunks(PING.len()).take(whole).all(|p| p == PING),
            "the client sent something that is not PING"
        );
        pending.drain(..whole * PING.len());
        for _ in 0..whole {
            seen += 1;
            let reply: &[u8] = match answer {
                Answer::SomeErrors if seen % 3 == 0 => b"-ERR not today\r\n",
                Answer::Garbage => b":1\r\n",
                _ => b"+PONG\r\n",
            };
            let ok = if seen % 7 == 0 {
                reply.iter().all(|b| s.write_all(std::slice::from_ref(b)).is_ok())
            } else {
                s.write_all(reply).is_ok()
            };
            if !ok {
                return;
            }
        }
    }
}

fn server(answer: Answer) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_conn(s, answer));
        }
    });
    addr
}

fn run(addr: SocketAddr, inflight: usize) -> LoadReport {
    load::run(&LoadConfig {
        connections: 4,
        inflight,
        threads: 2,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        ..LoadConfig::new(addr, Mode::Resp)
    })
    .unwrap()
}

#[test]
fn issue13_resp_pings_are_answered_in_order_however_the_answers_are_cut() {
    for inflight in [1, 16] {
        let r = run(server(Answer::Pong), inflight);
        assert_eq!(r.problems(), None, "inflight {inflight}");
        assert_eq!(r.mode, "resp");
        assert!(r.requests > 100, "{r:?}");
        assert!(r.e2e.count() >= r.requests);
    }
}

#[test]
fn issue13_resp_error_replies_are_counted_and_timed_apart() {
    let r = run(server(Answer::SomeErrors), 4);
    let errors = r.errors.get(&RESP_ERROR_CODE).copied().unwrap_or(0);
    assert!(errors > 10, "{r:?}");
    assert!(r.requests > 20, "{r:?}");
    assert!(r.e2e_error.count() > 0);
    // One in three is an error: the ratio holds whatever the timing.
    let share = errors as f64 / (errors + r.requests) as f64;
    assert!((0.2..0.5).contains(&share), "{share} of answers were errors");
    assert_eq!((r.connections_lost, r.bad_frames), (0, 0));
}

#[test]
fn issue13_resp_answers_that_are_not_pong_lose_the_connection() {
    let r = run(server(Answer::Garbage), 2);
    assert_eq!(r.connections_lost, 4, "{r:?}");
    assert!(r.bad_frames >= 4);
    assert_eq!(r.requests, 0);
}

/// A redis-server on a free port, killed on drop.
struct Redis(Child);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn issue13_resp_mode_drives_a_real_redis_server() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""])
        .args(["--appendonly", "no", "--loglevel", "warning"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(child) = child else {
        eprintln!("SKIPPED: redis-server is not installed (scripts/bench.sh installs it for the suite)");
        return;
    };
    let _redis = Redis(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let t0 = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "redis-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    for inflight in [1, 16] {
        let r = run(addr, inflight);
        assert_eq!(r.problems(), None, "inflight {inflight}");
        assert!(r.requests > 100, "{r:?}");
    }
}
