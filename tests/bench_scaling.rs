//! `cnse-dp bench-scaling` as one process (no MPI): what a user sees.
//! The MPI runs are in scripts/test-mpi.sh.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .arg("bench-scaling")
        .args(args)
        .output()
        .expect("run cnse-dp")
}

#[test]
fn issue10_every_task_runs_exactly_once_alone_with_cancels() {
    let dir = std::env::temp_dir().join(format!("cnse-bench-scaling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("s.csv");
    let out = bench(&[
        "--tasks",
        "1500",
        "--task-us",
        "200",
        "--cores",
        "2",
        "--service",
        "exp",
        "--arrival",
        "rank0",
        "--cancel-every",
        "9",
        "--results-per-task",
        "4",
        "--check",
        "--csv",
        csv.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    for col in [
        "policy",
        "ranks",
        "tasks",
        "throughput_tasks_s",
        "efficiency",
        "p50_us",
        "p99_us",
    ] {
        assert!(header.split(',').any(|c| c == col), "CSV header lacks {col}: {header}");
    }
    let policies: Vec<&str> = lines.map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(policies, ["steal", "static", "none"], "one row per policy");
    assert!(
        text.lines().skip(1).all(|l| l.contains(",true,")),
        "exactly once in every row:\n{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn issue10_bad_arguments_are_one_line_and_non_zero() {
    for args in [
        &["--policy", "bogus"][..],
        &["--tasks", "0"],
        &["--service", "x"],
        &["--cores", "0"],
    ] {
        let out = bench(args);
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("cnse-dp: "), "{err}");
    }
}

/// Both wake mechanisms work on this kernel and report a latency table.
#[test]
fn issue10_bench_wake_runs_both_mechanisms() {
    let out = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["bench-wake", "--rounds", "300", "--warmup", "50"])
        .output()
        .expect("run cnse-dp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for m in ["msg-ring", "eventfd"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(m))
            .unwrap_or_else(|| panic!("no {m} row:\n{stdout}"));
        assert!(line.split_whitespace().nth(1) == Some("300"), "{line}");
    }
}
