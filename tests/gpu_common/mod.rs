//! Helpers shared by the GPU suites (`tests/gpu_resident.rs`,
//! `tests/gpu_verify_merkle.rs`): the visible skip when the device lacks
//! what a test needs, deterministic bytes and temporary files.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Whether a test can run: `ok`, else it prints `skipped: {why}` and
/// returns false (and fails under `CNSE_REQUIRE_GPU=1`). The no-driver
/// case is `cnse_kernels::device::gpu_or_skip`.
pub fn or_skip(ok: bool, why: &str) -> bool {
    cnse_kernels::device::or_skip(ok, why, why)
}

/// Fast deterministic bytes (xorshift, eight at a time).
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ len as u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A file removed on drop.
pub struct TempFile(pub PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `data` written to `cnse-gpu-{name}-{pid}` in the temporary folder.
pub fn temp_file(name: &str, data: &[u8]) -> TempFile {
    let path = std::env::temp_dir().join(format!("cnse-gpu-{name}-{}", std::process::id()));
    std::fs::File::create(&path).unwrap().write_all(data).unwrap();
    TempFile(path)
}
