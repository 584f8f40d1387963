//! The one error type of the crate. Every variant names the operation and the
//! path (or digest, or URL) it failed on, so a CLI can print it as one line.

use std::io;
use std::path::PathBuf;

use crate::Digest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    // The io::Error is part of the message, not a `source`, so a chain
    // printer (anyhow's `{:#}`) does not say it twice.
    #[error("{op} {}: {error}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("invalid digest {input:?}: {reason}")]
    BadDigest { input: String, reason: &'static str },
    #[error("invalid reference {input:?}: {reason}")]
    BadRef { input: String, reason: &'static str },
    #[error("{what} not found in store {}", store.display())]
    NotFound { what: String, store: PathBuf },
    #[error("{what} not found on filer {url}")]
    RemoteNotFound { what: String, url: String },
    #[error("manifest {} is invalid: {reason}", path.display())]
    BadManifest { path: PathBuf, reason: String },
    #[error("{}: {reason}", path.display())]
    BadInput { path: PathBuf, reason: String },
    #[error("blob {digest} is corrupt: {detail}")]
    Corrupt { digest: Digest, detail: String },
    #[error("{digest} is referenced by {refs}; pass --force to remove the references too")]
    Referenced { digest: Digest, refs: String },
    #[error("invalid option {option}: {reason}")]
    BadOption { option: &'static str, reason: String },
    #[error("{method} {url}: {reason}")]
    Http {
        method: &'static str,
        url: String,
        reason: String,
    },
    #[error("{method} {url}: HTTP {status}")]
    HttpStatus {
        method: &'static str,
        url: String,
        status: u16,
    },
    #[error("remote blob {digest}: {detail}")]
    RemoteCorrupt { digest: Digest, detail: String },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Attaches an operation and a path to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|error| StoreError::Io {
            op,
            path: path.into(),
            error,
        })
    }
}
