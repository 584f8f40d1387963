//! The steady state allocates nothing per frame: after a warm-up load, a
//! second identical load moves the server's allocation counter (printed on
//! its stats line) by almost nothing while it carries well over 100,000
//! frames.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn settled(s: &Server, key: &str) -> u64 {
    // Two stats lines in a row with the same value: the load is over.
    let mut last = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(120));
        let now = s.stat(key);
        if let (Some(v), true) = (now, now == last) {
            return v;
        }
        last = now;
    }
    panic!("stats never settled: {:?}", s.output());
}

fn load(s: &Server, mode: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args([
            "bench",
            "--addr",
            &s.addr.to_string(),
            "--mode",
            mode,
            "--connections",
            "32",
            "--inflight",
            "4",
        ])
        .args(["--duration-secs", "1", "--warmup-secs", "0"])
        .output()
        .expect("run cnse-dp bench");
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn issue2_steady_state_allocates_nothing_per_frame() {
    steady_state_allocations(&[]);
}

#[test]
fn issue13_ablation_io_modes_allocate_nothing_per_frame() {
    // Plain receives into each slot's own buffer, SEND_ZC held until its
    // notification, one frame per send: still nothing per frame.
    steady_state_allocations(&[
        "--recv-mode",
        "plain",
        "--send-mode",
        "zc",
        "--max-frames-per-send",
        "1",
    ]);
}

#[test]
fn issue13_fixed_send_buffers_allocate_nothing_per_frame() {
    // Registered send buffers, lent per send and given back at the
    // completion (WRITE_FIXED) or the notification (SEND_ZC); with 4 for
    // the load's 32 connections, most sends find them lent and go out from
    // the session's buffer: still nothing per frame.
    steady_state_allocations(&["--send-mode", "fixed"]);
    steady_state_allocations(&["--send-mode", "zc-fixed", "--send-fixed-buffers", "4"]);
}

fn steady_state_allocations(extra: &[&str]) {
    let mut args = [synthetic(0, 0), vec!["--stats-interval-ms".into(), "100".into()]].concat();
    args.extend(extra.iter().map(|a| a.to_string()));
    let s = Server::start(&strs(&args));
    // Warm-up: connection slots, stream slots and buffers reach their size.
    load(&s, "generate");
    load(&s, "generate");
    load(&s, "ping");
    let (allocs0, frames0) = (settled(&s, "allocs"), settled(&s, "frames_out"));
    load(&s, "generate");
    load(&s, "ping");
    let (allocs1, frames1) = (settled(&s, "allocs"), settled(&s, "frames_out"));
    let frames = frames1 - frames0;
    let allocs = allocs1 - allocs0;
    assert!(frames > 50_000, "the load carried {frames} frames");
    assert!(
        allocs * 10_000 < frames,
        "{allocs} allocations for {frames} frames in the steady state"
    );
}
