//! Issue 15, resident blobs: a blob's page-cache pages stay registered
//! across loads (`SourceMode::Resident`, `Streamer::set_resident`), so later
//! loads only DMA. A resident blob loads with device bytes equal to the
//! file, with either mover and pieces that chunks straddle; verification on
//! the GPU still catches a bit flipped in the registered pages and names
//! the leaf; the byte budget evicts (unregisters) the least recently loaded
//! blob, and loads after an eviction are still right. Without a CUDA driver
//! each test prints why it is skipped (and fails under CNSE_REQUIRE_GPU=1).

mod gpu_common;

use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::{
    DeviceBlob, GpuVerifier, GpuVerifyOptions, LeafSpec, LoadOptions, Mover, ResidentOptions, SourceMode, Streamer,
    StreamerConfig,
};
use gpu_common::{noise, or_skip, temp_file, TempFile};

const CHUNK: u64 = 16 << 20;
const LEAF: u64 = 64 << 10;

struct Blob {
    file: TempFile,
    data: Vec<u8>,
    spec: OwnedSpec,
    leaves: Vec<[u8; 32]>,
}

fn blob(tag: &str, len: usize, seed: u64) -> Blob {
    let data = noise(len, seed);
    let file = temp_file(&format!("resident-{tag}"), &data);
    let (spec, leaves) = OwnedSpec::from_file_with_leaves(&file.0, CHUNK, LEAF, 4).unwrap();
    Blob {
        file,
        data,
        spec,
        leaves,
    }
}

fn gpu_with_registration(st: &Streamer) -> bool {
    or_skip(st.supports_register(), "the device lacks read-only host registration")
}

fn streamer(mover: Mover, budget_bytes: u64, piece_bytes: u64, overlap: bool) -> Streamer {
    let mut st = Streamer::new(
        0,
        StreamerConfig {
            threads: 2,
            mover,
            ..Default::default()
        },
    )
    .unwrap();
    st.set_resident(ResidentOptions {
        budget_bytes,
        piece_bytes,
        overlap,
        ..Default::default()
    })
    .unwrap();
    st
}

fn verified(gpu: &GpuVerifier, st: &mut Streamer, b: &Blob, threads: usize) -> Result<DeviceBlob, String> {
    let leaves = LeafSpec {
        leaf_bytes: LEAF,
        digests: &b.leaves,
    };
    gpu.load(
        st,
        &b.spec.as_spec(),
        &leaves,
        LoadOptions::new(false, SourceMode::Resident, threads),
        GpuVerifyOptions { window_bytes: 64 << 20 },
    )
    .map(|(blob, _)| blob)
    .map_err(|e| e.to_string())
}

fn assert_equal_to_file(blob: &DeviceBlob, b: &Blob, what: &str) {
    let mut got = vec![0u8; b.data.len()];
    blob.buffer.copy_to_host(0, &mut got).unwrap();
    if let Some(at) = got.iter().zip(&b.data).position(|(g, w)| g != w) {
        panic!("{what}: device byte {at} differs from the file");
    }
}

#[test]
fn issue15_a_resident_blob_loads_with_device_bytes_equal_to_the_file() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    // A tail that is neither a page nor a 16-byte multiple; 6 MiB pieces,
    // so chunks straddle registrations; and the whole blob in one piece.
    let b = blob("equal", (100 << 20) + 12_345, 3);
    // Last: registered chunk by chunk inside the first load.
    let cases = [
        (Mover::Kernel, 6 << 20, false),
        (Mover::CopyEngine, 6 << 20, false),
        (Mover::Kernel, 0, false),
        (Mover::CopyEngine, 0, true),
    ];
    for (mover, piece, overlap) in cases {
        let mut st = streamer(mover, 256 << 20, piece, overlap);
        if !gpu_with_registration(&st) {
            return;
        }
        let gpu = GpuVerifier::new(&st).unwrap();
        let what = format!("{mover}, pieces of {piece} bytes, overlapped {overlap}");
        for (n, threads) in [(1, 1), (2, 2), (3, 1)] {
            let loaded = verified(&gpu, &mut st, &b, threads).unwrap_or_else(|e| panic!("{what}: load {n}: {e}"));
            assert!(loaded.verified);
            assert_equal_to_file(&loaded, &b, &format!("{what}, GPU-verified load {n}"));
        }
        let opts = LoadOptions::new(false, SourceMode::Resident, 2);
        let (plain, report) = st.load(&b.spec.as_spec(), opts).unwrap();
        assert_equal_to_file(&plain, &b, &format!("{what}, unverified load"));
        assert_eq!(
            report.register_s, 0.0,
            "{what}: a resident blob is not registered again"
        );
        let s = st.resident_stats();
        let pieces = match (overlap, piece) {
            (true, _) => b.data.len().div_ceil(CHUNK as usize) as u64,
            (false, 0) => 1,
            (false, p) => b.data.len().div_ceil(p as usize) as u64,
        };
        assert_eq!((s.misses, s.hits, s.registrations), (1, 3, pieces), "{what}: {s:?}");
        assert_eq!((s.entries, s.resident_bytes), (1, b.data.len() as u64), "{what}: {s:?}");
        // Host verification is the GPU's job here.
        let opts = LoadOptions::new(true, SourceMode::Resident, 1);
        assert!(st.load(&b.spec.as_spec(), opts).is_err());
    }
}

#[test]
fn issue15_a_bit_flipped_in_a_resident_blob_is_caught_and_named() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let b = blob("flip", 64 << 20, 5);
    let mut st = streamer(Mover::Kernel, 128 << 20, 64 << 20, false);
    if !gpu_with_registration(&st) {
        return;
    }
    let gpu = GpuVerifier::new(&st).unwrap();
    let first = verified(&gpu, &mut st, &b, 1).unwrap();
    assert_equal_to_file(&first, &b, "before the flip");
    drop(first);
    // The registered pages are the file's page cache: a write lands in
    // them, as a corrupting writer's would.
    let at = 2 * CHUNK + 5 * LEAF + 77;
    let f = std::fs::OpenOptions::new().write(true).open(&b.file.0).unwrap();
    let flip = |byte: u8| std::os::unix::fs::FileExt::write_all_at(&f, &[byte], at).unwrap();
    flip(b.data[at as usize] ^ 0x04);
    let msg = verified(&gpu, &mut st, &b, 1)
        .err()
        .expect("a flipped bit must fail the load");
    assert!(msg.contains("chunk 2 leaf 5 of the chunk"), "{msg}");
    assert!(msg.contains("device memory freed"), "{msg}");
    flip(b.data[at as usize]);
    let again = verified(&gpu, &mut st, &b, 2).unwrap();
    assert_equal_to_file(&again, &b, "after the byte was restored");
    let s = st.resident_stats();
    assert_eq!((s.misses, s.hits), (1, 2), "the blob stayed resident throughout: {s:?}");
    drop(again);

    // Registered chunk by chunk inside a first load that fails: the load
    // names the leaf and nothing stays registered; once the byte is
    // restored, the next load registers the blob anew.
    let mut st = streamer(Mover::CopyEngine, 128 << 20, 64 << 20, true);
    flip(b.data[at as usize] ^ 0x04);
    let msg = verified(&gpu, &mut st, &b, 2)
        .err()
        .expect("a flipped bit must fail the load");
    assert!(msg.contains("chunk 2 leaf 5 of the chunk"), "{msg}");
    let s = st.resident_stats();
    assert_eq!((s.entries, s.misses, s.resident_bytes), (0, 0, 0), "{s:?}");
    assert!(s.registrations > 0 && s.unregistrations == s.registrations, "{s:?}");
    let failed_registrations = s.registrations;
    flip(b.data[at as usize]);
    let fresh = verified(&gpu, &mut st, &b, 2).unwrap();
    assert_equal_to_file(&fresh, &b, "overlapped first load after the byte was restored");
    let s = st.resident_stats();
    assert_eq!((s.entries, s.misses), (1, 1), "{s:?}");
    assert_eq!(s.registrations, failed_registrations + 4, "one piece per chunk: {s:?}");
}

#[test]
fn issue15_the_byte_budget_evicts_and_unregisters_the_least_recently_loaded_blob() {
    if !cnse_kernels::device::gpu_or_skip() {
        return;
    }
    let (a, c) = (blob("evict-a", 40 << 20, 7), blob("evict-b", 40 << 20, 8));
    // Room for one blob of 5 pieces of 8 MiB.
    let mut st = streamer(Mover::CopyEngine, 64 << 20, 8 << 20, false);
    if !gpu_with_registration(&st) {
        return;
    }
    let gpu = GpuVerifier::new(&st).unwrap();
    for (n, b) in [&a, &c, &a, &a].into_iter().enumerate() {
        let loaded = verified(&gpu, &mut st, b, 2).unwrap_or_else(|e| panic!("load {n}: {e}"));
        assert_equal_to_file(&loaded, b, &format!("load {n}"));
    }
    let s = st.resident_stats();
    // a (miss), b (miss, evicts a), a (miss, evicts b), a (hit).
    assert_eq!((s.misses, s.hits, s.evictions), (3, 1, 2), "{s:?}");
    assert_eq!((s.registrations, s.unregistrations), (15, 10), "{s:?}");
    assert_eq!((s.entries, s.resident_bytes), (1, 40 << 20), "{s:?}");
    // Larger than the budget: refused, nothing evicted.
    let big = blob("evict-big", 72 << 20, 9);
    let msg = verified(&gpu, &mut st, &big, 1).err().expect("over budget");
    assert!(msg.contains("cannot be made resident within a budget"), "{msg}");
    assert_eq!(st.resident_stats().entries, 1);
    // `store gc` deletes blob files: the entry keeps its own mapping until
    // it is evicted, here by a budget of 0.
    std::fs::remove_file(&a.file.0).unwrap();
    st.set_resident(ResidentOptions {
        budget_bytes: 0,
        ..st.resident_options()
    })
    .unwrap();
    let s = st.resident_stats();
    assert_eq!((s.entries, s.resident_bytes, s.unregistrations), (0, 0, 15), "{s:?}");
}

/// Needs no GPU: the CLI refuses resident loads verified on the host
/// before it looks for a device, in one line and a non-zero status.
#[test]
fn issue15_gpu_load_refuses_resident_blobs_verified_on_the_host() {
    let b = blob("cli", 1 << 20, 11);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["gpu", "load", "--file"])
        .arg(&b.file.0)
        .args(["--resident-gib", "1", "--verify", "cpu"])
        .output()
        .expect("run cnse-dp");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("resident blobs are verified on the GPU"), "{stderr}");
}
