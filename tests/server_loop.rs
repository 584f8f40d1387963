//! Issue 9, the loop's measurement and polling options: `--stage-timing`
//! accounts for every request it served, `--busy-poll-us` serves and then
//! lets the core go when traffic stops, and the load generator's open loop
//! splits its latency into the generator's lag and the round trip; issue
//! 13's `--batch-wait-us` streams every token and sleeps when idle.

mod common;

use std::time::Duration;

use common::*;

/// SIGINT, then the lines the server printed until it exited.
fn stop_and_read(s: &mut Server) -> Vec<String> {
    // SAFETY: kill(2) with a child pid this test owns and a valid signal.
    unsafe { libc::kill(s.pid() as libc::pid_t, libc::SIGINT) };
    assert!(eventually(WAIT, || !s.alive()), "server did not exit on SIGINT");
    // The reader threads may still be draining the pipes.
    let _ = eventually(Duration::from_secs(2), || {
        s.output().iter().any(|l| l.starts_with("events/turn"))
    });
    s.output()
}

/// `stage count` of the stage table (second column).
fn stage_count(out: &[String], stage: &str) -> u64 {
    out.iter()
        .find_map(|l| l.strip_prefix(stage))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{stage}` row in {out:#?}"))
}

#[test]
fn issue9_stage_timing_accounts_for_every_request() {
    let mut args = synthetic(0, 0);
    args.push("--stage-timing".into());
    let mut s = Server::start(&strs(&args));
    let mut c = s.client();
    const N: u64 = 40;
    for id in 1..=N {
        c.request(id, 0, &params(8), "stage timing").unwrap();
    }
    let mut ended = 0;
    for _ in 0..N {
        loop {
            let f = c.next_frame().unwrap();
            if f.kind == Kind::End {
                ended += 1;
                break;
            }
            assert_eq!(f.kind, Kind::Tokens, "{f:?}");
        }
    }
    assert_eq!(ended, N);
    drop(c);
    let out = stop_and_read(&mut s);
    assert!(
        out.iter().any(|l| l == "stage timing, worker 0:"),
        "no stage table: {out:#?}"
    );
    // Every request that ended went through each stage exactly once.
    for stage in ["recv→parse", "parse→backend", "backend→end", "end→submit"] {
        assert_eq!(stage_count(&out, stage), N, "{stage}: {out:#?}");
    }
    assert!(stage_count(&out, "turn busy") > 0, "{out:#?}");
    // issue 13: every percentile, in order.
    let head = out
        .iter()
        .find(|l| l.starts_with("stage ") && l.contains("count"))
        .unwrap();
    let cols: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(
        cols,
        ["stage", "count", "mean", "p50", "p90", "p95", "p99", "p99.9", "max"]
    );
    assert!(stage_count(&out, "events/turn") > 0, "{out:#?}");
}

#[test]
fn issue9_without_stage_timing_no_table() {
    let mut s = Server::start(&strs(&synthetic(0, 0)));
    let mut c = s.client();
    c.request(1, 0, &params(4), "x").unwrap();
    read_stream(&mut c, 1);
    drop(c);
    let out = stop_and_read(&mut s);
    assert!(!out.iter().any(|l| l.starts_with("stage timing")), "{out:#?}");
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let (user, system) = cnse_client::load::cpu_ticks(pid).expect("the server's /proc/PID/stat");
    user + system
}

/// A second of idleness costs the server well under a tenth of a core,
/// and a request after it is answered.
fn idle_costs_little_then_answers(s: &Server, c: &mut Client) {
    std::thread::sleep(Duration::from_millis(200));
    let hz = 100; // USER_HZ on Linux
    let before = cpu_ticks(s.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(s.pid()) - before;
    assert!(used * 10 < hz, "idle server used {used} ticks of CPU in 1 s");
    c.request(1000, 0, &params(2), "again").unwrap();
    assert_eq!(read_stream(c, 1000).last().unwrap().kind, Kind::End);
}

#[test]
fn issue9_busy_polling_serves_then_sleeps_when_traffic_stops() {
    let mut args = synthetic(0, 0);
    args.extend(["--busy-poll-us".into(), "2000".into()]);
    let s = Server::start(&strs(&args));
    let mut c = s.client();
    for round in 0..200u64 {
        c.request(round + 1, 0, &params(4), "poll").unwrap();
        let frames = read_stream(&mut c, round + 1);
        assert_eq!(frames.last().unwrap().kind, Kind::End, "{frames:?}");
        assert_eq!(token_count(&frames), 4);
    }
    // Idle: the worker polls for 2 ms after the last completion, then
    // blocks (a server that kept spinning would burn its whole core).
    idle_costs_little_then_answers(&s, &mut c);
}

#[test]
fn issue13_batched_waiting_streams_every_token_and_sleeps_when_idle() {
    // A 50 µs window: an idle worker that woke each window would show.
    let mut args = synthetic(0, 1000);
    args.extend(["--batch-wait-us".into(), "50".into()]);
    let s = Server::start(&strs(&args));
    let mut clients: Vec<_> = (0..4).map(|_| s.client()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(i as u64 + 1, 0, &params(16), "batched").unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let frames = read_stream(c, i as u64 + 1);
        assert_eq!(frames.last().unwrap().kind, Kind::End, "{frames:?}");
        assert_eq!(token_count(&frames), 16);
    }
    // Idle: a window with nothing in it must not end the wait (the ring
    // passes the kernel an overall timeout), so the worker does not wake
    // every 50 µs.
    idle_costs_little_then_answers(&s, &mut clients[0]);
}

#[test]
fn issue9_open_loop_splits_latency_into_send_delay_and_rtt() {
    let s = Server::start(&strs(&synthetic(0, 0)));
    for extra in [&[][..], &["--busy-poll"][..]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(["bench", "--addr", &s.addr.to_string(), "--mode", "generate"])
            .args(["--connections", "4", "--inflight", "2", "--max-tokens", "4"])
            .args(["--rate", "2000", "--duration-secs", "0.5", "--warmup-secs", "0.1"])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let count = |row: &str| -> u64 {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(row))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no {row} row: {stdout}"))
        };
        // Every measured request has all three: e2e = send_delay + rtt.
        let e2e = count("e2e ");
        assert!(e2e >= 900, "{stdout}");
        assert_eq!(count("send_delay "), e2e, "{stdout}");
        assert_eq!(count("rtt "), e2e, "{stdout}");
        assert!(!stdout.contains("problems"), "{stdout}");
    }
}

#[test]
fn issue13_ablation_switches_serve_the_same_stream() {
    // Plain rings, receive buffers smaller than one frame, a tiny send
    // limit: every stream still arrives whole, with cnse-dp's text.
    let mut args = synthetic(0, 0);
    for a in [
        "--no-defer-taskrun",
        "--recv-buffer-bytes",
        "1024",
        "--send-buffer-bytes",
        "4096",
    ] {
        args.push(a.into());
    }
    let s = Server::start(&strs(&args));
    let mut c = s.client();
    let prompt = "x".repeat(3000);
    for id in 1..=4u64 {
        let p = Params {
            seed: id,
            ..params(500)
        };
        c.request(id, 0, &p, &prompt).unwrap();
        let frames = read_stream(&mut c, id);
        assert_eq!(token_count(&frames), 500);
        let text: Vec<u8> = frames
            .iter()
            .filter(|f| f.kind == Kind::Tokens)
            .flat_map(|f| f.payload.clone())
            .collect();
        assert_eq!(text, cnse_backend::synthetic::expected_text(&prompt, id, 500));
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["serve", "--recv-buffer-bytes", "100"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--recv-buffer-bytes must be in"));
    for bad in [["--send-fixed-buffers", "0"], ["--send-fixed-bytes", "100"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(["serve", "--send-mode", "fixed", bad[0], bad[1]])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{} must be in", bad[0])), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn issue13_recv_send_and_coalescing_switches_serve_the_same_stream() {
    // Each I/O ablation switch, and all of them at once: every stream
    // arrives whole with cnse-dp's text, and PONGs echo their payload at
    // every size (SEND_ZC's buffer is reused only after its notification).
    for extra in [
        &["--recv-mode", "plain"][..],
        &["--send-mode", "zc"],
        &["--send-mode", "fixed"],
        &["--send-mode", "zc-fixed"],
        // One small registered buffer: short sends (a PONG of 200,000 bytes
        // goes out in 4 KiB pieces).
        &[
            "--send-mode",
            "fixed",
            "--send-fixed-buffers",
            "1",
            "--send-fixed-bytes",
            "4096",
        ],
        &[
            "--send-mode",
            "zc-fixed",
            "--send-fixed-buffers",
            "1",
            "--send-fixed-bytes",
            "4096",
        ],
        &["--max-frames-per-send", "1"],
        &[
            "--recv-mode",
            "plain",
            "--send-mode",
            "zc",
            "--max-frames-per-send",
            "2",
            "--recv-buffer-bytes",
            "1024",
        ],
    ] {
        let mut args = synthetic(0, 0);
        args.extend(extra.iter().map(|a| a.to_string()));
        let s = Server::start(&strs(&args));
        let mut c = s.client();
        let prompt = "y".repeat(3000);
        // Several streams in flight on one connection, so that a send has
        // frames of more than one stream to carry.
        for id in 1..=4u64 {
            c.request(
                id,
                0,
                &Params {
                    seed: id,
                    ..params(300)
                },
                &prompt,
            )
            .unwrap();
        }
        let mut text: std::collections::HashMap<u64, Vec<u8>> = Default::default();
        let mut ended = 0;
        while ended < 4 {
            let f = c.next_frame().unwrap();
            match f.kind {
                Kind::Tokens => text.entry(f.stream_id).or_default().extend_from_slice(&f.payload),
                Kind::End => ended += 1,
                k => panic!("{extra:?}: unexpected {k:?}"),
            }
        }
        for id in 1..=4u64 {
            assert_eq!(
                text[&id],
                cnse_backend::synthetic::expected_text(&prompt, id, 300),
                "{extra:?} stream {id}"
            );
        }
        for (k, n) in [0usize, 1, 4096, 65536, 200_000].into_iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            c.ping(100 + k as u64, 7, 9, &payload).unwrap();
            let f = c.next_frame().unwrap();
            assert_eq!(
                (f.kind, f.stream_id),
                (Kind::Pong, 100 + k as u64),
                "{extra:?} ping {n}"
            );
            assert!(f.payload == payload, "{extra:?} ping {n}: payload differs");
        }
    }
}
