//! Read-ahead for cold loads: a thread asks the kernel to start reading the
//! blob into the page cache (`posix_fadvise(WILLNEED)`, one window at a
//! time, in file order) while the workers fault pages in chunk by chunk, so
//! the disk sees long sequential requests and deep queues from the start.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::KernelError;

/// Bytes asked for per `posix_fadvise` call.
pub const READAHEAD_STEP_BYTES: u64 = 64 << 20;

/// A running read-ahead; stopped and joined on drop.
pub struct Readahead {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Readahead {
    /// Starts reading `path` ahead, from its start, up to `limit_bytes`
    /// (the caller bounds it by the memory it may fill: the page cache
    /// drops what it cannot keep, it does not fail).
    pub fn start(path: &Path, limit_bytes: u64) -> Result<Readahead, KernelError> {
        let file = File::open(path).map_err(|source| KernelError::Io {
            op: "open for read-ahead",
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| KernelError::Io {
                op: "stat for read-ahead",
                path: path.to_path_buf(),
                source,
            })?
            .len()
            .min(limit_bytes);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut off = 0u64;
            while off < len && !flag.load(Ordering::Relaxed) {
                let n = READAHEAD_STEP_BYTES.min(len - off);
                // SAFETY: posix_fadvise only reads its integer arguments; the
                // descriptor is open for the thread's whole life (`file`).
                let rc = unsafe {
                    libc::posix_fadvise(file.as_raw_fd(), off as i64, n as i64, libc::POSIX_FADV_WILLNEED)
                };
                if rc != 0 {
                    break; // advice only: the load reads the bytes anyway
                }
                off += n;
            }
        });
        Ok(Readahead {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
