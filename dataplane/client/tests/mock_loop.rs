//! The load generator and the blocking client against a minimal in-test
//! server (threads, std sockets) that follows the page for the frames it
//! uses: HELLO/HELLO_ACK, PING/PONG, REQUEST -> one-token TOKENS frames
//! within credit -> END. It checks the client side on its own; the real
//! server's tests are the workspace's tests/server_*.rs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use cnse_client::load::{self, LoadConfig, Mode};
use cnse_client::Client;
use cnse_proto::*;

/// How the mock answers a REQUEST.
#[derive(Clone, Copy)]
enum Style {
    /// One token per TOKENS frame, within credit.
    OnePerFrame,
    /// Every token the credit allows in one TOKENS frame (a zero-delay
    /// backend's shape).
    Packed,
    /// ERROR 429 on the request's stream.
    Refuse,
}

fn serve_conn(mut s: TcpStream, style: Style) {
    s.set_nodelay(true).unwrap();
    let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::new();
    // stream id -> (next token index, max tokens, credit left; u64::MAX = unlimited)
    let mut streams: std::collections::HashMap<u64, (u64, u64, u64)> = Default::default();
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut input = &buf[..n];
        while let Some(f) = d.next(&mut input).unwrap() {
            let id = f.header.stream_id();
            match f.kind {
                Kind::Hello => put_hello_ack(&mut out, 1 << 20, "mock"),
                Kind::Ping => put_pong(&mut out, id, f.header.arg(), f.header.aux(), f.payload),
                Kind::Request if matches!(style, Style::Refuse) => put_error(&mut out, id, 429, "busy"),
                Kind::Request => {
                    let r = Params::parse(f.payload, &ParamLimits::default()).unwrap();
                    let credit = match f.header.arg() {
                        0 => u64::MAX,
                        c => u64::from(c),
                    };
                    streams.insert(id, (0, u64::from(r.params.max_tokens), credit));
                }
                Kind::Credit => {
                    if let Some(st) = streams.get_mut(&id) {
                        st.2 += u64::from(f.header.arg());
                    }
                }
                _ => {}
            }
        }
        streams.retain(|id, (next, max, credit)| {
            if matches!(style, Style::Packed) && *next < *max && *credit > 0 {
                let n = (*max - *next).min(*credit);
                let text: Vec<u8> = (0..n).flat_map(|_| *b"tok ").collect();
                put_tokens(&mut out, *id, n as u32, *next, &text);
                *next += n;
                *credit -= n;
            }
            while *next < *max && *credit > 0 {
                put_tokens(&mut out, *id, 1, *next, b"tok ");
                *next += 1;
                *credit -= 1;
            }
            if *next == *max {
                put_end(&mut out, *id, FinishReason::Length, *max, 5, 9);
                return false;
            }
            true
        });
        if s.write_all(&out).is_err() {
            return;
        }
        out.clear();
    }
}

fn mock_server() -> std::net::SocketAddr {
    mock_server_with(Style::OnePerFrame)
}

fn mock_server_with(style: Style) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve_conn(s, style));
        }
    });
    addr
}

#[test]
fn blocking_client_generates_and_pings() {
    let addr = mock_server();
    let (mut c, ack) = Client::connect_hello(addr, b"", Duration::from_secs(5)).unwrap();
    assert_eq!(ack.server, "mock");
    let p = Params {
        max_tokens: 5,
        ..Params::default()
    };
    let mut seen = 0;
    let g = c.generate(1, 0, &p, "hi", |_, n| seen += n).unwrap();
    assert_eq!((g.tokens, g.end_tokens, seen), (5, 5, 5));
    assert_eq!(g.text, b"tok tok tok tok tok ");
    assert_eq!((g.server_ttft_us, g.server_total_us), (5, 9));
    c.ping(7, 8, 9, b"echo").unwrap();
    let f = c.next_frame().unwrap();
    assert_eq!(
        (f.kind, f.stream_id, f.arg, f.aux, &f.payload[..]),
        (Kind::Pong, 7, 8, 9, &b"echo"[..])
    );
}

#[test]
fn writer_sends_while_the_client_reads_and_buffered_frame_never_blocks() {
    let addr = mock_server();
    let (mut c, _) = Client::connect_hello(addr, b"", Duration::from_secs(5)).unwrap();
    // Nothing sent yet: no frame is buffered, and asking does not block.
    assert!(c.buffered_frame().unwrap().is_none());
    let mut w = c.writer().unwrap();
    w.set_write_timeout(Duration::from_secs(5)).unwrap();
    let params = Params {
        max_tokens: 4,
        ..Params::default()
    };
    // Sent from another thread while this one reads.
    let sender = std::thread::spawn(move || {
        w.request(1, 2, &params, "hi").unwrap();
        w.credit(1, 2).unwrap();
        w
    });
    let (mut tokens, mut ended) = (0, false);
    while !ended {
        // One blocking read, then whatever else is already whole.
        let mut next = Some(c.next_frame().unwrap());
        while let Some(f) = next {
            assert_eq!(f.stream_id, 1);
            match f.kind {
                Kind::Tokens => tokens += f.arg,
                Kind::End => ended = true,
                k => panic!("unexpected {k:?}"),
            }
            next = c.buffered_frame().unwrap();
        }
    }
    assert_eq!(tokens, 4);
    // Shutting the writer down ends the reader's stream.
    sender.join().unwrap().shutdown().unwrap();
    assert!(matches!(c.next_frame(), Err(cnse_client::ClientError::Closed { .. })));
}

fn quick(addr: std::net::SocketAddr, mode: Mode) -> LoadConfig {
    LoadConfig {
        connections: 4,
        inflight: 4,
        threads: 2,
        duration: Duration::from_millis(400),
        warmup: Duration::from_millis(100),
        ..LoadConfig::new(addr, mode)
    }
}

#[test]
fn closed_loop_ping_counts_and_records() {
    let addr = mock_server();
    let r = load::run(&quick(addr, Mode::Ping { payload_bytes: 64 })).unwrap();
    assert_eq!(r.problems(), None);
    assert!(r.requests > 100, "{r:?}");
    assert!(r.e2e.count() >= r.requests);
    assert_eq!(r.summaries().len(), 1);
}

#[test]
fn closed_loop_generate_with_credit_windows() {
    let addr = mock_server();
    let mode = Mode::Generate {
        max_tokens: 16,
        credit: 4,
        temperature: 0.0,
        prompt: "hello".into(),
    };
    let r = load::run(&quick(addr, mode)).unwrap();
    assert_eq!(r.problems(), None);
    assert!(r.requests > 10, "{r:?}");
    // Every completed request carried exactly 16 tokens; the window may cut
    // streams, so compare approximately.
    let per = r.tokens as f64 / r.requests as f64;
    assert!((per - 16.0).abs() < 2.0, "{per}");
    assert_eq!(r.ttft.count(), r.e2e.count());
    assert_eq!(r.inter_token.count(), r.ttft.count() * 15);
    assert_eq!(r.tokens_coalesced, 0, "one token per frame: nothing arrived together");
}

#[test]
fn issue13_tokens_packed_in_one_frame_are_coalesced_not_zero_gaps() {
    let addr = mock_server_with(Style::Packed);
    let mode = Mode::Generate {
        max_tokens: 16,
        credit: 4,
        temperature: 0.0,
        prompt: "hello".into(),
    };
    let r = load::run(&quick(addr, mode)).unwrap();
    assert_eq!(r.problems(), None);
    assert!(r.requests > 10, "{r:?}");
    // Four frames of four tokens per stream: three gaps between frames,
    // twelve tokens that arrived with an earlier one.
    assert_eq!(r.inter_token.count(), r.ttft.count() * 3);
    let per = r.tokens_coalesced as f64 / r.tokens as f64;
    assert!((per - 0.75).abs() < 0.05, "{} of {}", r.tokens_coalesced, r.tokens);
    let rates = r.rates();
    assert!(rates
        .iter()
        .any(|x| x.metric == "tokens_coalesced" && x.count == r.tokens_coalesced));
}

#[test]
fn issue13_error_replies_are_timed_in_their_own_row() {
    let addr = mock_server_with(Style::Refuse);
    let mode = Mode::Generate {
        max_tokens: 4,
        credit: 0,
        temperature: 0.0,
        prompt: "hello".into(),
    };
    let r = load::run(&quick(addr, mode)).unwrap();
    assert_eq!((r.requests, r.e2e.count()), (0, 0));
    assert!(r.e2e_error.count() > 100, "{r:?}");
    let rows: Vec<String> = r.summaries().into_iter().map(|s| s.metric).collect();
    assert!(rows.contains(&"e2e_error".to_string()), "{rows:?}");
    let all = r.summaries().into_iter().find(|s| s.metric == "e2e_all").unwrap();
    assert_eq!(all.count, r.e2e_error.count());
    assert!(r.problems().unwrap().contains("ERROR 429"));
}

#[test]
fn issue13_the_load_generator_reports_its_own_cpu() {
    let addr = mock_server();
    let r = load::run(&quick(addr, Mode::Ping { payload_bytes: 64 })).unwrap();
    assert!(r.load_cpu > Duration::ZERO, "{r:?}");
    // Two threads over a 400 ms window use at most 800 ms (and a margin
    // for the clock samples' placement).
    assert!(r.load_cpu < Duration::from_millis(900), "{:?}", r.load_cpu);
    let cpu = r.cpu_use();
    assert_eq!(cpu[0].metric, "load_cpu");
    assert_eq!(cpu[0].count, r.load_cpu.as_micros() as u64);
}

#[test]
fn issue13_the_servers_cpu_is_split_into_user_and_kernel_time() {
    // The mock server runs in this process: measure it as the server.
    let addr = mock_server();
    let mut cfg = quick(addr, Mode::Ping { payload_bytes: 64 });
    cfg.server_pid = Some(std::process::id());
    let r = load::run(&cfg).unwrap();
    let (cpu, share) = (r.server_cpu.unwrap(), r.server_kernel_share.unwrap());
    // Loopback TCP: the kernel's part is never nothing, and never more
    // than the whole.
    assert!(share > 0.0 && share <= 1.0, "{share}");
    let kernel = r.server_kernel_cpu().unwrap();
    assert!(kernel <= cpu, "{kernel:?} of {cpu:?}");
    let rates = r.cpu_use();
    let row = rates
        .iter()
        .find(|x| x.metric == "server_kernel_cpu")
        .expect("a row for the CSV");
    assert_eq!(row.count, kernel.as_micros() as u64);
    assert!(r.client_kernel_share.is_some_and(|s| s > 0.0 && s <= 1.0), "{r:?}");
}

#[test]
fn open_loop_holds_the_offered_rate() {
    let addr = mock_server();
    let mut cfg = quick(addr, Mode::Ping { payload_bytes: 8 });
    cfg.rate_per_s = Some(2_000.0);
    cfg.duration = Duration::from_secs(1);
    let r = load::run(&cfg).unwrap();
    assert_eq!(r.problems(), None);
    let rate = r.requests_per_s();
    assert!((1_800.0..=2_200.0).contains(&rate), "{rate}");
}

#[test]
fn open_loop_over_capacity_reports_unsent() {
    // A server that accepts and answers HELLO, then never replies: every
    // slot stays busy and the schedule runs ahead.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut b = [0u8; 32];
                s.read_exact(&mut b).unwrap();
                let mut out = Vec::new();
                put_hello_ack(&mut out, 1 << 20, "mute");
                s.write_all(&out).unwrap();
                let mut sink = [0u8; 4096];
                while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
            });
        }
    });
    let mut cfg = quick(addr, Mode::Ping { payload_bytes: 8 });
    cfg.rate_per_s = Some(1_000.0);
    cfg.drain_timeout = Duration::from_millis(100);
    let r = load::run(&cfg).unwrap();
    assert_eq!(r.requests, 0);
    assert_eq!(r.unfinished, 16, "{r:?}");
    assert!(r.unsent > 300, "{r:?}");
    assert!(r.problems().unwrap().contains("never sent"));
    // issue 13: the requests never sent still count, from their intended
    // send to when the run gave up (the 16 sent ones were intended in the
    // warm-up, so they are not measured).
    assert_eq!(r.e2e_unsent.count(), r.unsent);
    let all = r.e2e_all().unwrap();
    assert_eq!(all.count(), r.unsent);
    // The last one was intended just before the window's end and waited
    // at least the drain timeout; the first waited the whole window too.
    assert!(all.min_us() >= 100_000, "{}", all.min_us());
    assert!(all.max_us() >= 400_000, "{}", all.max_us());
    let rows: Vec<String> = r.summaries().into_iter().map(|s| s.metric).collect();
    assert!(
        rows.contains(&"e2e_unsent".to_string()) && rows.contains(&"e2e_all".to_string()),
        "{rows:?}"
    );
}

#[test]
fn issue13_an_open_loop_backlog_is_sent_after_the_window_and_measured() {
    // A server that answers only after a pause: the schedule runs ahead
    // of the 16 slots, and the backlog goes out as they free up, after
    // the window closed, each measured from its intended time.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut hello = [0u8; HEADER_BYTES];
                s.read_exact(&mut hello).unwrap();
                let mut out = Vec::new();
                put_hello_ack(&mut out, 1 << 20, "slow");
                s.write_all(&out).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                serve_conn(s, Style::OnePerFrame)
            });
        }
    });
    let mut cfg = quick(addr, Mode::Ping { payload_bytes: 8 });
    cfg.rate_per_s = Some(2_000.0);
    cfg.warmup = Duration::ZERO;
    cfg.duration = Duration::from_millis(400);
    cfg.drain_timeout = Duration::from_secs(5);
    let r = load::run(&cfg).unwrap();
    assert_eq!((r.unsent, r.unfinished), (0, 0), "{r:?}");
    // 800 intended in the window, every one answered and measured.
    let all = r.e2e_all().unwrap();
    assert!((790..=810).contains(&all.count()), "{}", all.count());
    assert_eq!(all.count(), r.e2e.count());
    assert!(r.e2e.max_us() >= 250_000, "the pause shows: {}", r.e2e.max_us());
}

#[test]
fn request_bound_runs_exactly_that_many() {
    let addr = mock_server();
    for rate in [None, Some(20_000.0)] {
        let mut cfg = quick(addr, Mode::Ping { payload_bytes: 16 });
        cfg.requests = Some(1_001);
        cfg.rate_per_s = rate;
        cfg.duration = Duration::from_secs(30);
        let t = std::time::Instant::now();
        let r = load::run(&cfg).unwrap();
        assert_eq!(r.problems(), None);
        assert_eq!(r.requests, 1_001, "{rate:?}");
        assert_eq!(r.e2e.count(), 1_001);
        assert!(r.window < Duration::from_secs(5), "{:?}", r.window);
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "ends with the requests, not the 30 s cap"
        );
    }
}
