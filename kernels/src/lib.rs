//! CUDA path of cnse-dp: pinned staging, verified model streaming into GPU
//! memory, and the token post-processing kernels (with CPU references).
//!
//! Builds without CUDA: the driver and NVRTC are loaded at run time, and
//! every entry point that needs them returns `KernelError::NoDriver` (or
//! `NoNvrtc`) instead of panicking when they are absent.

// `is_multiple_of` is newer than the workspace MSRV (1.80).
#![allow(clippy::manual_is_multiple_of)]

pub mod device;
pub mod model;
pub mod pinned;
pub mod readahead;
pub mod sampling;
pub mod sha256;
pub mod spec;
pub mod stream;
pub mod verify_gpu;

use std::path::PathBuf;

pub use cudarc;
pub use device::{cuda_available, DeviceInfo};
pub use pinned::{DeviceBuffer, PinnedBuffer};
pub use readahead::Readahead;
pub use sampling::cpu::CpuSampler;
pub use sampling::fast::{FastRow, Simd};
pub use sampling::gpu::{BatchSampler, LogitKernels};
pub use sampling::parallel::ParallelCpuSampler;
pub use sampling::{SampleRow, SamplerConfig, TokenSampler};
pub use sha256::{LeafHasher, LeafLaunch, LeafMismatch};
pub use spec::{hash_chunks, hash_file, OwnedSpec};
pub use stream::{
    BlobSpec, DeviceBlob, LoadOptions, LoadReport, Mover, Pipeline, Prefault, ResidentOptions, ResidentStats,
    SourceMode, Streamer, StreamerConfig,
};
pub use verify_gpu::{GpuVerifier, GpuVerifyOptions, LeafSpec};

/// Every error of this crate: what was being done, and on which file, chunk
/// or device.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("no CUDA driver found (libcuda.so could not be loaded)")]
    NoDriver,
    #[error("no NVRTC library found (libnvrtc.so; add CUDA's lib64 to LD_LIBRARY_PATH)")]
    NoNvrtc,
    #[error("CUDA device {ordinal} not found ({count} device(s) present)")]
    NoDevice { ordinal: usize, count: usize },
    #[error("CUDA {op}: {source}")]
    Driver {
        op: &'static str,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("NVRTC compile of {file}: {detail}")]
    Compile { file: &'static str, detail: String },
    #[error("{op}: bad shape: {detail}")]
    Shape { op: &'static str, detail: String },
    #[error("invalid sampling row: {0}")]
    InvalidRow(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Spec { path: PathBuf, detail: String },
    #[error("{}: chunk {chunk} (bytes {offset}..{end}) does not match its manifest digest: load aborted, device memory freed", path.display())]
    ChunkMismatch {
        path: PathBuf,
        chunk: usize,
        offset: u64,
        end: u64,
    },
    #[error("{}: chunk {chunk} leaf {leaf} of the chunk (bytes {offset}..{end}) does not match its manifest digest ({bad_leaves} bad leaves found on the GPU; the load stopped after {copied_bytes} of {size_bytes} bytes were copied): load aborted, device memory freed", path.display())]
    LeafMismatch {
        path: PathBuf,
        chunk: u64,
        leaf: u64,
        offset: u64,
        end: u64,
        bad_leaves: u32,
        /// Bytes copied to the device before the load stopped.
        copied_bytes: u64,
        size_bytes: u64,
    },
    #[error("{}: chunk {chunk}'s digest is not the Merkle root of the manifest's leaf digests (a corrupt or forged manifest): load aborted, device memory freed", path.display())]
    Unbound { path: PathBuf, chunk: u64 },
    #[error("load of {} aborted: {detail}", path.display())]
    Aborted { path: PathBuf, detail: String },
}

impl KernelError {
    pub(crate) fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> KernelError {
        move |source| KernelError::Driver { op, source }
    }
}
