//! Issue 15, manifest format 3 on the GPU: the leaves a GPU checks must
//! hash up to the chunk digests (Merkle roots) or the load is refused; a
//! leaf mismatch stops the load at the first failed window, before the rest
//! of the blob is copied; a format-2 manifest is verified on the host until
//! `store upgrade` rewrites it. Without a CUDA driver each test prints why
//! it is skipped (and fails under CNSE_REQUIRE_GPU=1).

mod gpu_common;

use std::process::Command;

use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::{GpuVerifier, GpuVerifyOptions, KernelError, LeafSpec, LoadOptions, SourceMode, Streamer};
use gpu_common::{noise, temp_file};

fn device_free() -> usize {
    cnse_kernels::cudarc::driver::result::mem_get_info().unwrap().0
}

#[test]
fn issue15_a_leaf_mismatch_stops_the_load_before_the_rest_is_copied() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let (chunk, leaf) = (16u64 << 20, 64u64 << 10);
    let size = 3u64 << 30;
    let data = noise(size as usize, 21);
    let file = temp_file("merkle-early", &data);
    let (spec, leaf_sums) = OwnedSpec::from_file_with_leaves(&file.0, chunk, leaf, 8).unwrap();
    let leaves = LeafSpec {
        leaf_bytes: leaf,
        digests: &leaf_sums,
    };
    // One bit of chunk 0, leaf 3.
    let f = std::fs::OpenOptions::new().write(true).open(&file.0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[data[3 * 65536 + 5] ^ 0x20], 3 * 65536 + 5).unwrap();
    drop((f, data));
    let mut st = Streamer::new(0, Default::default()).unwrap();
    let gpu = GpuVerifier::new(&st).unwrap();
    st.context().bind_to_thread().unwrap();
    let free_before = device_free();
    let threads = st.config().threads;
    let err = gpu
        .load(
            &mut st,
            &spec.as_spec(),
            &leaves,
            LoadOptions::new(false, SourceMode::Mmap, threads),
            GpuVerifyOptions { window_bytes: 64 << 20 },
        )
        .err()
        .expect("a flipped bit must fail the load");
    let msg = err.to_string();
    let KernelError::LeafMismatch {
        chunk: 0,
        leaf: 3,
        bad_leaves: 1,
        copied_bytes,
        size_bytes,
        ..
    } = err
    else {
        panic!("wrong error: {msg}");
    };
    assert_eq!(size_bytes, size);
    assert!(
        msg.contains(&format!(
            "the load stopped after {copied_bytes} of {size_bytes} bytes were copied"
        )),
        "{msg}"
    );
    assert!(
        msg.contains("chunk 0 leaf 3 of the chunk (bytes 196608..262144)"),
        "{msg}"
    );
    assert!(msg.contains("device memory freed"), "{msg}");
    // The first 64 MiB window fails: its launch waits for all of its
    // copies, and the load stops once its report is back, before the rest
    // of the blob is copied. (How far the copies got by then depends on
    // the device: 0.5-2 GB on the H200, so the blob is 3 GiB.)
    eprintln!("stopped after {copied_bytes} of {size_bytes} bytes");
    assert!(
        copied_bytes >= 64 << 20 && copied_bytes < size_bytes,
        "copied {copied_bytes} of {size_bytes} bytes before stopping"
    );
    st.context().bind_to_thread().unwrap();
    assert!(device_free() + (4 << 20) >= free_before, "device memory leaked");
}

#[test]
fn issue15_leaves_that_do_not_hash_to_the_chunk_digests_are_refused() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let (chunk, leaf) = (1u64 << 20, 64u64 << 10);
    let data = noise((8 << 20) + 100, 22);
    let file = temp_file("merkle-unbound", &data);
    let (spec, _) = OwnedSpec::from_file_with_leaves(&file.0, chunk, leaf, 4).unwrap();
    // Bytes changed in chunk 2, and leaves forged to match them: every leaf
    // passes on the GPU, but they do not hash up to chunk 2's digest.
    let mut bad = data.clone();
    bad[(2 << 20) + 77] ^= 1;
    std::fs::write(&file.0, &bad).unwrap();
    let forged = cnse_store::leaf_digests_parallel(&bad, leaf, 4);
    let leaves = LeafSpec {
        leaf_bytes: leaf,
        digests: &forged,
    };
    let mut st = Streamer::new(0, Default::default()).unwrap();
    let gpu = GpuVerifier::new(&st).unwrap();
    let opts = LoadOptions::new(false, SourceMode::Mmap, 4);
    let err = gpu
        .load(&mut st, &spec.as_spec(), &leaves, opts, GpuVerifyOptions::default())
        .err()
        .expect("unbound leaves must fail the load");
    assert!(matches!(err, KernelError::Unbound { chunk: 2, .. }), "{err}");
    assert!(
        err.to_string().contains("chunk 2's digest is not the Merkle root"),
        "{err}"
    );
    // The host path checks the same roots while staging.
    let err = st
        .load(&spec.as_spec(), LoadOptions::new(true, SourceMode::Mmap, 4))
        .err()
        .expect("the host check must fail too");
    assert!(matches!(err, KernelError::ChunkMismatch { chunk: 2, .. }), "{err}");
    // Plain chunk digests (format 1 or 2) are never checked through leaves.
    std::fs::write(&file.0, &data).unwrap();
    let plain = OwnedSpec::from_file(&file.0, chunk, 4).unwrap();
    let good = cnse_store::leaf_digests_parallel(&data, leaf, 4);
    let leaves = LeafSpec {
        leaf_bytes: leaf,
        digests: &good,
    };
    let err = gpu
        .load(&mut st, &plain.as_spec(), &leaves, opts, GpuVerifyOptions::default())
        .err()
        .expect("plain chunk digests must be refused on the GPU");
    assert!(err.to_string().contains("store upgrade"), "{err}");
}

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

#[test]
fn issue15_a_format_2_manifest_loads_verified_on_the_host_until_upgraded() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("cnse-gpu-merkle-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = noise((5 << 20) + 3, 23);
    let file = dir.join("m.bin");
    std::fs::write(&file, &data).unwrap();
    let store = cnse_store::Store::open(dir.join("store")).unwrap();
    let opts = cnse_store::PutOptions {
        name: Some("m:2".parse().unwrap()),
        chunk_bytes: 1 << 20,
        ..Default::default()
    };
    // SAFETY: this test owns the file and never truncates it while mapped.
    let src = unsafe { cnse_store::SourceFile::open(&file) }.unwrap();
    let d = store.put(&src, &opts, &|_| {}).unwrap().digest;
    // Rewrite the manifest as format 2 wrote it: plain chunk digests.
    let mp = store.manifest_path(&d);
    let mut rec = store.manifest(&d).unwrap().record();
    rec.format_version = 2;
    rec.chunk_digests = cnse_store::chunk_digests_parallel(&data, 1 << 20, cnse_store::ChunkScheme::Plain, 2);
    std::fs::remove_file(&mp).unwrap();
    std::fs::write(&mp, rec.encode()).unwrap();
    let s = dir.join("store");
    let s = s.to_str().unwrap();

    let (code, _, stderr) = cnse_dp(&["gpu", "load", "m:2", "--store", s, "--verify", "gpu"]);
    assert_eq!(code, 1);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("is format 2") && stderr.contains("store upgrade m:2"),
        "{stderr}"
    );
    let (code, stdout, stderr) = cnse_dp(&["gpu", "load", "m:2", "--store", s, "--check"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("checked on the host"), "{stdout}");
    let (code, stdout, stderr) = cnse_dp(&["store", "--store", s, "upgrade", "m:2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("upgraded (format 2 -> 3"), "{stdout}");
    let (code, stdout, stderr) = cnse_dp(&["gpu", "load", "m:2", "--store", s, "--check"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("checked on the GPU"), "{stdout}");
    assert!(stdout.contains("device bytes equal the file"), "{stdout}");
    std::fs::remove_dir_all(&dir).unwrap();
}
