//! Issue 11, the soak: a short `cnse-dp soak` passes and leaves its CSV,
//! plot and summary; and the counter it found wrong (a CANCEL was in no
//! outcome of `cnse_requests_total`) now counts.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

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

#[test]
fn issue11_a_short_soak_passes_and_writes_its_csv_plot_and_summary() {
    raise_nofile(20_000);
    let out = std::env::temp_dir().join(format!("cnse-soak-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["soak", "--duration-secs", "12", "--seed", "11", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "soak failed:\n{stdout}\n{stderr}");
    assert!(stdout.starts_with("soak: seed 11,"), "the seed comes first: {stdout}");
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    let csv = std::fs::read_to_string(out.join("soak.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("t_s,phase,rss_kib,fds,"), "{}", rows[0]);
    // Three baseline samples, a sample a second while the population ran
    // (the machine may be slow: at least most of them), some after.
    let phase = |p: &str| rows.iter().filter(|r| r.split(',').nth(1) == Some(p)).count();
    assert_eq!(phase("baseline"), 3, "{csv}");
    assert!(phase("run") >= 8, "{csv}");
    assert!(phase("after") >= 1, "{csv}");
    // Every actor did something that was checked, and nothing failed.
    let last: Vec<u64> = rows
        .last()
        .unwrap()
        .split(',')
        .skip(14)
        .map(|v| v.parse().unwrap())
        .collect();
    for (i, pair) in last.chunks(2).enumerate() {
        assert!(
            pair[0] > 0 && pair[1] == 0,
            "actor {i}: passed {} failed {}",
            pair[0],
            pair[1]
        );
    }
    let svg = std::fs::read_to_string(out.join("soak.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("server RSS"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(
        summary.contains("verdict: PASS") && summary.contains("RSS (MiB)"),
        "{summary}"
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn issue11_soak_arguments_are_checked_in_one_line() {
    let run = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["soak", "--duration-secs", "0"])
        .output()
        .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--duration-secs must be at least 1"), "{err}");
}

#[test]
fn issue11_a_soak_whose_server_dies_fails_and_says_why() {
    raise_nofile(20_000);
    let mut s = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let m = metrics_addr(&s);
    let out = std::env::temp_dir().join(format!("cnse-soak-dies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let soak = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["soak", "--duration-secs", "600", "--seed", "3"])
        .args(["--addr", &s.addr.to_string(), "--pid", &s.pid().to_string()])
        .args(["--metrics", &m.to_string(), "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the population has run a few seconds (rows in the CSV), the
    // server is killed under it.
    let rows = || {
        std::fs::read_to_string(out.join("soak.csv"))
            .map(|t| t.lines().filter(|l| l.contains(",run,")).count())
            .unwrap_or(0)
    };
    assert!(
        eventually(WAIT * 3, || rows() >= 3),
        "the soak never sampled a running population"
    );
    let pid = libc::pid_t::try_from(s.pid()).unwrap();
    assert!(pid > 0);
    // SAFETY: kill sends SIGKILL to the test's own child server, a positive pid.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    assert!(eventually(WAIT, || !s.alive()));
    let run = soak.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let fails: Vec<&str> = stderr.lines().filter(|l| l.starts_with("soak: FAIL: ")).collect();
    assert!(
        fails.contains(&"soak: FAIL: the server process died during the run"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&run.stdout).contains("verdict: FAIL"),
        "the summary says so too"
    );
    let _ = std::fs::remove_dir_all(&out);
}
