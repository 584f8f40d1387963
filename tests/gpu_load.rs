//! Verified streaming into GPU memory (issue 5): the device bytes equal the
//! file, a corrupted chunk aborts the load, names the chunk and frees the
//! device memory. Without a CUDA driver each test prints why it is skipped.

mod gpu_common;

use std::path::Path;

use cnse_kernels::stream::OwnedSpec;
use cnse_kernels::{KernelError, LoadOptions, Mover, SourceMode, Streamer, StreamerConfig};
use gpu_common::{noise, temp_file, TempFile};

fn gpu_present() -> bool {
    cnse_kernels::device::gpu_or_skip()
}

fn blob(tag: &str, len: usize) -> (TempFile, Vec<u8>) {
    let data = noise(len, 1);
    (temp_file(&format!("load-{tag}"), &data), data)
}

fn device_bytes(blob: &cnse_kernels::DeviceBlob) -> Vec<u8> {
    let mut out = vec![0u8; blob.size_bytes as usize];
    blob.buffer.copy_to_host(0, &mut out).unwrap();
    out
}

fn small_pool(threads: usize) -> StreamerConfig {
    StreamerConfig {
        threads,
        slot_bytes: 1 << 20,
        slots_per_thread: 2,
        streams: 3,
        write_combined: false,
        copy_granule_bytes: 64 << 10,
        mover: Mover::CopyEngine,
    }
}

#[test]
fn loaded_bytes_equal_the_file_for_every_mode_issue_5() {
    if !gpu_present() {
        return;
    }
    // 37 MiB + 123 bytes: a short last chunk; chunks smaller than, equal to
    // and larger than the 1 MiB staging slot.
    let (file, data) = blob("modes", (37 << 20) + 123);
    for chunk_bytes in [(256 << 10) + 3, 1 << 20, 4 << 20] {
        let spec = OwnedSpec::from_file(&file.0, chunk_bytes, 4).unwrap();
        for (wc, mover) in [
            (false, Mover::CopyEngine),
            (true, Mover::CopyEngine),
            (false, Mover::Kernel),
        ] {
            let mut streamer = Streamer::new(
                0,
                StreamerConfig {
                    write_combined: wc,
                    mover,
                    ..small_pool(4)
                },
            )
            .unwrap();
            for (verify, source) in [
                (true, SourceMode::Mmap),
                (false, SourceMode::Mmap),
                (true, SourceMode::Pread),
                (true, SourceMode::Register),
                (false, SourceMode::Register),
            ] {
                if wc && verify && source == SourceMode::Pread {
                    continue; // rejected by design: hashing write-combined memory
                }
                if source == SourceMode::Register && !streamer.supports_register() {
                    println!("register mode not tested: the device lacks read-only host registration");
                    continue;
                }
                if source == SourceMode::Register && chunk_bytes % 4096 != 0 {
                    let err = streamer
                        .load(&spec.as_spec(), LoadOptions::new(verify, source, 1))
                        .err()
                        .unwrap();
                    assert!(err.to_string().contains("needs chunks of whole pages"), "{err}");
                    continue;
                }
                for threads in [1, 4] {
                    let (b, report) = streamer
                        .load(&spec.as_spec(), LoadOptions::new(verify, source, threads))
                        .unwrap_or_else(|e| {
                            panic!("chunk {chunk_bytes} wc {wc} {mover} {source} verify {verify}: {e}")
                        });
                    assert_eq!(b.verified, verify);
                    assert_eq!(b.digest, spec.digest);
                    assert_eq!(report.bytes, data.len() as u64);
                    assert!(
                        device_bytes(&b) == data,
                        "chunk {chunk_bytes} wc {wc} {source} verify {verify} threads {threads}"
                    );
                }
            }
        }
    }
}

fn corrupt(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], offset).unwrap();
}

#[test]
fn a_flipped_bit_aborts_the_load_and_names_the_chunk_issue_5() {
    if !gpu_present() {
        return;
    }
    let chunk = 4u64 << 20;
    let (file, data) = blob("corrupt", 200 << 20);
    let spec = OwnedSpec::from_file(&file.0, chunk, 4).unwrap();
    corrupt(&file.0, 37 * chunk + 12345);
    let mut streamer = Streamer::new(0, small_pool(8)).unwrap();
    let mut kernel_streamer = Streamer::new(
        0,
        StreamerConfig {
            mover: Mover::Kernel,
            ..small_pool(8)
        },
    )
    .unwrap();
    let ctx = streamer.context().clone();
    let (free_before, _) = ctx.mem_get_info().unwrap();
    let mut sources = vec![SourceMode::Mmap, SourceMode::Pread];
    if streamer.supports_register() {
        sources.push(SourceMode::Register);
    }
    for threads in [1, 8] {
        let err = kernel_streamer
            .load(&spec.as_spec(), LoadOptions::new(true, SourceMode::Mmap, threads))
            .err();
        let msg = err.expect("must fail").to_string();
        assert!(
            msg.contains("chunk 37 (bytes 155189248..159383552)"),
            "copy kernel, {threads} threads: {msg}"
        );
    }
    for source in sources {
        for threads in [1, 8] {
            let err = streamer
                .load(&spec.as_spec(), LoadOptions::new(true, source, threads))
                .err()
                .expect("must fail");
            match &err {
                KernelError::ChunkMismatch {
                    chunk: 37, offset, end, ..
                } => {
                    assert_eq!((*offset, *end), (37 * chunk, 38 * chunk));
                }
                other => panic!("{source} {threads}: wrong error {other}"),
            }
            let msg = err.to_string();
            assert!(msg.contains("chunk 37") && msg.contains("device memory freed"), "{msg}");
        }
    }
    let (free_after, _) = ctx.mem_get_info().unwrap();
    assert!(
        free_after + (16 << 20) >= free_before,
        "device memory leaked: {free_before} -> {free_after}"
    );

    // --no-verify loads the corrupted bytes as they are (measurement only).
    let (b, _) = streamer
        .load(&spec.as_spec(), LoadOptions::new(false, SourceMode::Mmap, 8))
        .unwrap();
    assert!(!b.verified);
    let dev = device_bytes(&b);
    assert_eq!(dev.len(), data.len());
    assert_ne!(dev, data);
}

#[test]
fn wrong_sizes_and_empty_blobs_issue_5() {
    if !gpu_present() {
        return;
    }
    let mut streamer = Streamer::new(0, small_pool(2)).unwrap();
    let (file, _) = blob("empty", 0);
    let spec = OwnedSpec::from_file(&file.0, 1 << 20, 2).unwrap();
    let (b, _) = streamer
        .load(&spec.as_spec(), LoadOptions::new(true, SourceMode::Mmap, 2))
        .unwrap();
    assert_eq!(b.size_bytes, 0);

    let (file, _) = blob("short", (3 << 20) + 5);
    let mut spec = OwnedSpec::from_file(&file.0, 1 << 20, 2).unwrap();
    spec.size_bytes += 1;
    let err = streamer
        .load(&spec.as_spec(), LoadOptions::new(true, SourceMode::Mmap, 2))
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .contains("file has 3145733 bytes, manifest says 3145734"),
        "{err}"
    );
    assert!(streamer
        .load(&spec.as_spec(), LoadOptions::new(true, SourceMode::Mmap, 3))
        .is_err());
}

#[test]
fn without_a_driver_the_streamer_says_so() {
    if cnse_kernels::cuda_available() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    let err = Streamer::new(0, StreamerConfig::default()).err().unwrap();
    assert_eq!(err.to_string(), "no CUDA driver found (libcuda.so could not be loaded)");
}
