//! `cnse-dp gpu` as a user runs it (issue 5): one-line errors without a GPU;
//! with one, `info` lists the device and `load` of a store blob verifies it
//! and puts the file's bytes on the device.

use std::path::PathBuf;
use std::process::Command;

fn cnse_dp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(args)
        .output()
        .expect("run cnse-dp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cnse-gpu-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn without_a_driver_every_gpu_command_prints_one_line_and_fails() {
    if cnse_kernels::cuda_available() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    let dir = temp_dir("nodriver");
    let file = dir.join("f.bin");
    std::fs::write(&file, b"hello").unwrap();
    for args in [
        vec!["gpu", "info"],
        vec!["gpu", "bench", "--sampling-only"],
        vec!["gpu", "load", "--file", file.to_str().unwrap()],
    ] {
        let (code, stdout, stderr) = cnse_dp(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(stdout.is_empty(), "{args:?}: {stdout}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains("no CUDA driver found"), "{args:?}: {stderr}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gpu_load_of_a_store_blob_verifies_and_checks_the_bytes_issue_5() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let (code, stdout, stderr) = cnse_dp(&["gpu", "info"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("device 0:"), "{stdout}");

    let dir = temp_dir("store");
    let file = dir.join("model.bin");
    let data: Vec<u8> = (0..(40u32 << 20) + 17)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let store = cnse_store::Store::open(dir.join("store")).unwrap();
    let opts = cnse_store::PutOptions {
        name: Some("tiny:1".parse().unwrap()),
        ..Default::default()
    };
    // SAFETY: this test owns the file and never truncates it while mapped.
    let src = unsafe { cnse_store::SourceFile::open(&file) }.unwrap();
    let put = store.put(&src, &opts, &|_| {}).unwrap();
    let store_dir = dir.join("store");
    let store_arg = store_dir.to_str().unwrap();

    for target in ["tiny:1".to_string(), format!("sha256:{}", put.digest.hex())] {
        let (code, stdout, stderr) = cnse_dp(&[
            "gpu",
            "load",
            &target,
            "--store",
            store_arg,
            "--check",
            "--threads",
            "4",
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("device bytes equal the file"), "{stdout}");
        assert!(
            stdout.contains(&format!("verified sha256:{}", put.digest.hex())),
            "{stdout}"
        );
        assert!(stdout.contains("GB/s"), "{stdout}");
        // `put` wrote leaf digests, so the default (`--verify auto`) checks
        // every leaf on the GPU (issue 15).
        assert!(stdout.contains("checked on the GPU"), "{stdout}");
    }
    for verify in ["cpu", "gpu"] {
        let (code, stdout, stderr) = cnse_dp(&[
            "gpu", "load", "tiny:1", "--store", store_arg, "--check", "--verify", verify,
        ]);
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains("device bytes equal the file"), "{stdout}");
        let on = if verify == "gpu" {
            "checked on the GPU"
        } else {
            "checked on the host"
        };
        assert!(stdout.contains(on), "{stdout}");
    }

    // A bit flipped in the stored blob: the load fails, naming the chunk.
    let blob = store.blob_path(&put.digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[(16 << 20) + 5] ^= 1;
    let mut perms = std::fs::metadata(&blob).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    std::fs::set_permissions(&blob, perms).unwrap();
    std::fs::write(&blob, &bytes).unwrap();
    let (code, _, stderr) = cnse_dp(&["gpu", "load", "tiny:1", "--store", store_arg, "--verify", "cpu"]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("chunk 1 (bytes 16777216..33554432)"), "{stderr}");
    // On the GPU the same flip is named down to its 64 KiB leaf (issue 15).
    let (code, _, stderr) = cnse_dp(&["gpu", "load", "tiny:1", "--store", store_arg]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("chunk 1 leaf 0 of the chunk (bytes 16777216..16842752)"),
        "{stderr}"
    );
    assert!(stderr.contains("device memory freed"), "{stderr}");

    let (code, _, stderr) = cnse_dp(&["gpu", "load", "nope:1", "--store", store_arg]);
    assert_eq!(code, 1);
    assert!(stderr.contains("not found"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn issue13_gpu_bench_sampling_runs_the_cpu_rows_without_a_gpu() {
    let args = [
        "gpu",
        "bench-sampling",
        "--cpu-only",
        "--batch",
        "6",
        "--vocab",
        "4096",
        "--threads",
        "2",
        "--reps",
        "1",
    ];
    let (code, stdout, stderr) = cnse_dp(&args);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("no GPU row (--cpu-only)"), "{stdout}");
    assert!(
        stdout.contains("CPU vectorised") && stdout.contains("2 threads"),
        "{stdout}"
    );
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| T=")).collect();
    assert_eq!(rows.len(), 4, "{stdout}");
    for row in rows {
        assert!(row.ends_with("| yes"), "ids differ: {row}");
    }
    for bad in [["--reps", "0"], ["--threads", "100000"]] {
        let (code, stdout, stderr) = cnse_dp(&["gpu", "bench-sampling", "--cpu-only", bad[0], bad[1]]);
        assert_eq!(code, 1, "{bad:?}");
        assert!(stdout.lines().all(|l| !l.starts_with("| T=")), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "{bad:?}: {stderr}");
    }
}
