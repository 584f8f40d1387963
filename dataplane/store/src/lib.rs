//! Content-addressed model store of cnse-dp.
//!
//! Blobs are named by the SHA-256 of their bytes (what `sha256sum` prints)
//! and written atomically; each has an rkyv manifest with one SHA-256 per
//! 64 KiB leaf and one digest per chunk (the Merkle root over its leaves,
//! `merkle.rs`), read in place from a map, so a blob can be verified on every core
//! and a bad chunk named exactly. References `name:tag` point at digests; a
//! byte budget evicts the least recently used blobs that no pinned reference
//! holds. Blobs move to and from an HTTP filer (SeaweedFS Filer API subset)
//! with resumable, chunk-verified pulls.
//!
//! The model story for the GPU path, one call per stage:
//! [`Store::resolve`] → [`Store::open_blob`] (mmap + manifest) →
//! [`Blob::bad_chunks`] / [`verify_chunks_parallel`] → hand the bytes on;
//! [`Store::open_verified`] does the middle two in one call. A consumer that
//! verifies chunk by chunk while copying uses [`Manifest::chunk_digests`],
//! [`chunk_range`], [`Manifest::chunk_scheme`] and [`ChunkHasher`].

// `is_multiple_of` is newer than the workspace MSRV (1.80).
#![allow(clippy::manual_is_multiple_of)]

mod digest;
mod error;
pub mod gguf;
mod hash;
pub mod http;
mod leaves;
mod manifest;
pub mod merkle;
pub mod progress;
mod refname;
pub mod remote;
mod store;
mod sys;
mod upgrade;

pub use digest::{hex, Digest, DIGEST_BYTES};
pub use error::{Result, StoreError};
pub use gguf::GgufInfo;
pub use hash::{
    chunk_count, chunk_digest, chunk_digests_parallel, chunk_range, default_threads, map_file, sha256_stream,
    verify_chunk, verify_chunks_parallel, HASH_STEP_BYTES,
};
pub use leaves::{
    bad_leaves, check_leaf_bytes, default_leaf_bytes, leaf_count, leaf_digests_parallel, LEAF_BYTES_DEFAULT,
    LEAF_BYTES_MAX, LEAF_BYTES_MIN,
};
pub use manifest::{
    check_chunk_bytes, LeafDigests, Manifest, ManifestRecord, ManifestRecordV1, CHUNK_BYTES_DEFAULT, CHUNK_BYTES_MAX,
    CHUNK_BYTES_MIN, FORMAT_VERSION, MANIFEST_MAGIC, MANIFEST_MAGIC_V1, MANIFEST_MAGIC_V2,
};
pub use merkle::{ChunkHasher, ChunkScheme};
pub use refname::{RefName, TAG_DEFAULT};
pub use remote::{Filer, PullOptions, PullOutcome, PullTarget, PushOutcome};
pub use store::{
    Blob, BlobEntry, GcReport, PutOptions, PutOutcome, RefEntry, RmOutcome, SourceFile, Store, StoreLock, VerifyReport,
};
pub use sys::LockKind;
pub use upgrade::Upgrade;
