//! Helpers shared by the GPU suites (`tests/gpu_resident.rs`,
//! `gpu_verify_merkle.rs`, `gpu_sha256.rs`, `gpu_load.rs`): the visible
//! skip when the device lacks what a test needs, deterministic bytes and
//! temporary files.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

/// Whether a test can run: `ok`, else it prints `skipped: {why}` and
/// returns false (and fails under `CNSE_REQUIRE_GPU=1`). The no-driver
/// case is `cnse_kernels::device::gpu_or_skip`.
pub fn or_skip(ok: bool, why: &str) -> bool {
    cnse_kernels::device::or_skip(ok, why, why)
}

#[path = "../noise/mod.rs"]
mod bytes;
pub use bytes::noise;

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
