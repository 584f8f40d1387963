//! `benches/bench_report.rs` (issue 13): the load generator's CSV rows,
//! behind `server,param,value`, become summary tables with ratios, the
//! targets' verdicts, and SVG plots.

#[path = "../benches/bench_report.rs"]
#[allow(dead_code)]
mod report;

use std::time::Duration;

use cnse_metrics::{csv_rows, LatencyHistogram, Rate, CSV_HEADER};

/// One run's rows as `cnse-dp bench --csv` writes them, behind the
/// experiment's columns.
fn rows(server: &str, param: &str, value: &str, run: &str, requests: u64, frames: u64, cpu_us: u64) -> String {
    let mut h = LatencyHistogram::new();
    for v in 1..=100 {
        h.record_us(v * 10);
    }
    let w = Duration::from_secs(1);
    let rates = [
        Rate::new("requests", requests, w),
        Rate::new("frames_in", frames, w),
        Rate::new("load_cpu", 500_000, w),
        Rate::new("server_cpu", cpu_us, w),
    ];
    behind(server, param, value, &csv_rows(run, &[h.summary("e2e")], &rates))
}

/// CSV rows behind the experiment's `server,param,value` columns.
fn behind(server: &str, param: &str, value: &str, rows: &str) -> String {
    rows.lines()
        .map(|l| format!("{server},{param},{value},{l}\n"))
        .collect()
}

/// A `server_kernel_cpu` row (the server's system time, CPU-µs per
/// second) for a run of `rows`.
fn kernel_row(server: &str, param: &str, value: &str, run: &str, kernel_us: u64) -> String {
    let rate = Rate::new("server_kernel_cpu", kernel_us, Duration::from_secs(1));
    behind(server, param, value, &csv_rows(run, &[], &[rate]))
}

/// An empty results directory for this test, and an experiment file's
/// header line.
fn results_dir(tag: &str) -> (std::path::PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("cnse-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir, format!("server,param,value,{CSV_HEADER}\n"))
}

#[test]
fn issue13_report_turns_the_suites_csvs_into_ratios_targets_and_plots() {
    let (dir, mut csv) = results_dir("report");
    // At 256 connections cnse-dp sends 3 M frames per server CPU-second
    // (1.5 M frames on half a core), tokio 1 M: 3× (target 2×). Of
    // cnse-dp's half core 80 % is the kernel's: 3.75 M frames per second
    // of its kernel time alone, 3.75× tokio's per CPU-second (the bound).
    for c in ["16", "256"] {
        let run = format!("ping c={c} k=16 t=1 closed loop");
        csv += &rows("cnse-dp", "connections", c, &run, 1_500_000, 1_500_000, 500_000);
        csv += &kernel_row("cnse-dp", "connections", c, &run, 400_000);
        csv += &rows("tokio", "connections", c, &run, 1_000_000, 1_000_000, 1_000_000);
    }
    std::fs::write(dir.join("connections.csv"), csv).unwrap();
    let pts = report::points(&report::load(&dir, "connections.csv"));
    assert_eq!(pts.len(), 4);
    assert_eq!(report::servers(&pts), ["cnse-dp", "tokio"]);
    let p = &pts[2];
    assert_eq!((p.mode(), p.label_num("c"), p.x()), ("ping", Some(256.0), Some(256.0)));
    assert_eq!(p.frames_per_server_cpu_s(), Some(3_000_000.0));
    assert_eq!(p.server_kernel_share(), Some(0.8));
    assert_eq!(p.frames_per_server_kernel_cpu_s(), Some(3_750_000.0));
    assert_eq!(pts[3].server_kernel_share(), None, "tokio's run has no kernel row");
    assert_eq!(p.pct(report::P50), Some(500.0));

    let plots = report::plots::write_all(&dir).unwrap();
    assert_eq!(plots, ["throughput_vs_connections.svg"]);
    let svg = std::fs::read_to_string(dir.join(&plots[0])).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cnse-dp") && svg.contains("tokio"));

    let md = report::summary::render(&dir, &plots);
    assert!(
        md.contains("| ping | 256 | tokio | 1,000,000 | 1,000,000 | 100 % | - |"),
        "{md}"
    );
    assert!(
        md.contains("| ping | 256 | cnse-dp | 1,500,000 | 3,000,000 | 50 % | 80 % |"),
        "{md}"
    );
    assert!(md.contains("| ping | tokio | ≥ 2.0× | 3.00× | yes | 3.75× |"), "{md}");
    assert!(md.contains("| ping | monoio | ≥ 1.0× | - | not measured | - |"), "{md}");
    assert!(md.contains("## Latency vs offered load\n\nNot run."), "{md}");
    assert!(md.contains("![throughput_vs_connections.svg](throughput_vs_connections.svg)"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn issue13_rounds_of_a_run_are_quoted_as_their_medians() {
    let (dir, mut csv) = results_dir("rounds");
    // Three rounds as scripts/bench.sh writes them with ROUNDS=3: cnse-dp
    // 1.0, 3.0 and 2.0 M frames per server CPU-second, tokio 1.0 M each
    // time; the middle round is the median, not the last or the mean.
    for (r, frames) in [(1, 1_000_000), (2, 3_000_000), (3, 2_000_000)] {
        let run = format!("ping c=256 k=16 t=1 closed loop r={r}");
        csv += &rows("cnse-dp", "inflight", "16", &run, frames, frames, 1_000_000);
        csv += &rows("tokio", "inflight", "16", &run, 1_000_000, 1_000_000, 1_000_000);
    }
    // A run without rounds is its own point.
    csv += &rows(
        "monoio",
        "inflight",
        "16",
        "ping c=256 k=16 t=1 closed loop",
        5,
        5,
        1_000_000,
    );
    std::fs::write(dir.join("inflight.csv"), csv).unwrap();
    let pts = report::points(&report::load(&dir, "inflight.csv"));
    assert_eq!(pts.len(), 3, "{pts:?}");
    let cnse = &pts[0];
    assert_eq!((cnse.server.as_str(), cnse.rounds), ("cnse-dp", 3));
    assert_eq!(
        cnse.run, "ping c=256 k=16 t=1 closed loop",
        "the round is not part of the run"
    );
    assert_eq!(cnse.rate("requests"), Some(2_000_000.0));
    assert_eq!(cnse.frames_per_server_cpu_s(), Some(2_000_000.0));
    assert_eq!(cnse.pct(report::P50), Some(500.0));
    assert_eq!((pts[2].server.as_str(), pts[2].rounds), ("monoio", 1));

    let md = report::summary::render(&dir, &[]);
    assert!(md.contains("the median of 3 rounds"), "{md}");
    assert!(md.contains("| 16 | tokio | 1,000,000 |"), "{md}");
    assert!(md.contains("| 16 | cnse-dp | 2,000,000 |"), "{md}");
    std::fs::remove_dir_all(&dir).unwrap();
}
