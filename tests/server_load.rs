//! Issue 2: many connections, disconnects that must free backend work, and
//! the bench/demo commands end to end.

mod common;
use common::*;

use std::time::{Duration, Instant};

#[test]
fn issue2_two_thousand_connections_each_streaming() {
    const CONNS: usize = 2_000;
    let limit = raise_nofile(2 * CONNS as u64 + 256);
    assert!(
        limit >= 2 * CONNS as u64 + 64,
        "RLIMIT_NOFILE {limit} too low for the test"
    );
    let s = Server::start(&strs(
        &[synthetic(1_000, 1_000), vec!["--max-connections".into(), "4096".into()]].concat(),
    ));
    let mut clients: Vec<Client> = (0..CONNS).map(|_| s.client()).collect();
    let t = Instant::now();
    // Every connection opens a stream with credit for one token and gets
    // it: then all 2,000 streams are open at once, waiting for credit.
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(
            1,
            1,
            &Params {
                seed: i as u64,
                ..params(20)
            },
            "many",
        )
        .unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let f = c.next_frame().unwrap();
        assert_eq!(
            (f.kind, f.stream_id, f.arg, f.aux),
            (Kind::Tokens, 1, 1, 0),
            "connection {i}"
        );
    }
    for c in clients.iter_mut() {
        c.credit(1, 19).unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let frames = read_stream(c, 1);
        assert_eq!(token_count(&frames), 19, "connection {i}");
        let end = frames.last().unwrap();
        assert_eq!((end.kind, end.aux), (Kind::End, 20), "connection {i}");
    }
    assert!(t.elapsed() < Duration::from_secs(30));
}

#[test]
fn issue2_disconnect_frees_backend_work() {
    let s = Server::start(&strs(
        &[synthetic(0, 1_000), vec!["--stats-interval-ms".into(), "100".into()]].concat(),
    ));
    let mut conns = Vec::new();
    for _ in 0..10 {
        let mut c = s.client();
        for id in 1..=10u64 {
            c.request(id, 0, &params(60_000), "endless").unwrap();
        }
        assert_eq!(c.next_frame().unwrap().kind, Kind::Tokens);
        conns.push(c);
    }
    let active_100 = eventually(Duration::from_secs(5), || last_active(&s) == Some(100));
    assert!(active_100, "stats show the 100 streams: {:?}", s.output());
    drop(conns);
    // A new client gets full service right away.
    let t = Instant::now();
    let g = s.client().generate(1, 0, &params(10), "next", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 10);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    let freed = eventually(Duration::from_secs(5), || last_active(&s) == Some(0));
    assert!(freed, "backend work freed after the disconnect: {:?}", s.output());
}

/// The `active=N` figure of the server's last stats line.
fn last_active(s: &Server) -> Option<u64> {
    s.output().iter().rev().find_map(|l| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("active="))
            .and_then(|v| v.trim_end_matches(',').parse().ok())
    })
}

#[test]
fn issue2_bench_cli_runs_and_writes_csv() {
    let s = Server::start(&strs(&synthetic(0, 0)));
    let csv = std::env::temp_dir().join(format!("cnse-bench-{}.csv", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["bench", "--addr", &s.addr.to_string(), "--mode", "generate"])
        .args([
            "--connections",
            "8",
            "--inflight",
            "2",
            "--max-tokens",
            "8",
            "--credit",
            "4",
        ])
        .args([
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0.2",
            "--csv",
            csv.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in ["ttft", "inter_token", "e2e", "p99.9", "requests", "tokens"] {
        assert!(stdout.contains(w), "{w} missing from {stdout}");
    }
    // issue 13: every percentile, the loop's kind, tokens that arrived
    // together, and the load generator's own CPU beside the result.
    let head = stdout.lines().find(|l| l.starts_with("latency")).unwrap();
    let cols: Vec<&str> = head.split_whitespace().collect();
    assert_eq!(cols[3..], ["p50", "p90", "p95", "p99", "p99.9", "max"], "{stdout}");
    assert!(
        stdout.contains("closed loop: latency from each request's send"),
        "{stdout}"
    );
    assert!(stdout.lines().any(|l| l.starts_with("coalesced")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("load cpu")), "{stdout}");
    assert!(!stdout.contains("problems"), "{stdout}");
    // The load generator allocates nothing per frame in the steady state.
    let allocations: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("allocations"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no allocations line in {stdout}"));
    assert!(allocations <= 8, "{allocations} allocations in the window: {stdout}");
    let text = std::fs::read_to_string(&csv).unwrap();
    std::fs::remove_file(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(cnse_metrics::CSV_HEADER));
    let rows: Vec<&str> = lines.collect();
    assert!(rows.iter().any(|r| r.contains(",e2e,us,")), "{text}");
    assert!(rows.iter().any(|r| r.contains(",tokens,per_s,")), "{text}");
    assert!(rows.iter().any(|r| r.contains("closed loop,load_cpu,per_s,")), "{text}");
    assert!(rows.iter().any(|r| r.contains(",tokens_coalesced,per_s,")), "{text}");
}

#[test]
fn issue2_bench_sweep_and_peak_fraction() {
    let s = Server::start(&strs(&synthetic(0, 0)));
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(["bench", "--addr", &s.addr.to_string(), "--mode", "generate"])
            .args(["--connections", "4", "--inflight", "4", "--max-tokens", "4"])
            .args([
                "--duration-secs",
                "0.5",
                "--warmup-secs",
                "0.1",
                "--server-pid",
                &s.pid().to_string(),
            ])
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let sweep = run(&["--sweep-rates", "500,1000"]);
    assert!(sweep.contains("offered"), "{sweep}");
    assert!(sweep.contains("500/s") && sweep.contains("1,000/s"), "{sweep}");
    assert!(sweep.contains("per server CPU-second"), "{sweep}");
    // issue 13: open-loop rows count every request intended in the window.
    assert!(sweep.contains("e2e_all") && sweep.contains("intended send"), "{sweep}");
    let head = sweep.lines().find(|l| l.trim_start().starts_with("offered")).unwrap();
    for w in ["p90", "p95", "p99.9", "unsent", "errors", "load cpu", "server cpu"] {
        assert!(head.contains(w), "{w} missing from {head}");
    }
    let peak = run(&["--peak-fraction", "0.5"]);
    assert!(peak.contains("open loop at 50% of the closed-loop peak"), "{peak}");
    // One e2e row per run; e2e_all (every request of the window) in the
    // open loop only, where the closed loop's rows had nothing to add.
    let rows = |name: &str| {
        peak.lines()
            .filter(|l| l.split_whitespace().next() == Some(name))
            .count()
    };
    assert_eq!((rows("e2e"), rows("e2e_all")), (2, 1), "{peak}");
    let bound = run(&["--requests", "500"]);
    let line = bound
        .lines()
        .find(|l| l.starts_with("requests "))
        .unwrap_or_else(|| panic!("{bound}"));
    assert_eq!(line.split_whitespace().nth(1), Some("500"), "{bound}");
}

#[test]
fn issue2_demo_runs_and_prints_the_latency_table() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args([
            "demo",
            "--duration-secs",
            "1",
            "--warmup-secs",
            "0.3",
            "--connections",
            "8",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for w in ["ttft", "inter_token", "e2e", "p99.9", "tokens", "server:"] {
        assert!(stdout.contains(w), "{w} missing from {stdout}");
    }
    assert!(!stdout.contains("problems"), "{stdout}");
    // The model's pace shows through: 5 ms per token, 20 ms to the first.
    let p50 = |metric: &str| -> f64 {
        let line = stdout.lines().find(|l| l.starts_with(metric)).unwrap();
        let v = line.split_whitespace().nth(3).unwrap();
        v.trim_end_matches("ms").parse().unwrap_or_else(|_| panic!("{line}"))
    };
    assert!((4.5..6.0).contains(&p50("inter_token")), "{stdout}");
    assert!((19.5..30.0).contains(&p50("ttft")), "{stdout}");
}
