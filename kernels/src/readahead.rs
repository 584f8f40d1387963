//! Read-ahead for cold loads. One thread reads the blob in file order with
//! large `pread`s (what `dd` does: the disk sees one sequential stream),
//! which fills the page cache; the load's workers wait at each chunk until
//! the reader has passed its end (`wait_for`), so they only ever touch
//! cached pages instead of faulting 16 scattered streams in from the disk.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::KernelError;

/// Bytes per `pread` of the reader (and its one buffer).
pub const READAHEAD_STEP_BYTES: usize = 16 << 20;

#[derive(Default)]
struct Front {
    /// Bytes from the start that are in the page cache.
    done: u64,
    /// The reader stopped (end of file, error, or drop): waiters go ahead.
    finished: bool,
}

struct Shared {
    front: Mutex<Front>,
    moved: Condvar,
    stop: AtomicBool,
}

/// A running sequential reader; stopped and joined on drop.
pub struct Readahead {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Readahead {
    /// Starts reading `path` from its start, up to `limit_bytes`.
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
        let shared = Arc::new(Shared {
            front: Mutex::new(Front::default()),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        // Doubles the kernel's read-ahead window for this file (advice
        // only, so its result is not checked).
        // SAFETY: fadvise on an open descriptor has no memory effects.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; READAHEAD_STEP_BYTES];
            let mut off = 0u64;
            while off < len && !sh.stop.load(Ordering::Relaxed) {
                let n = (READAHEAD_STEP_BYTES as u64).min(len - off) as usize;
                // Advice only: on an error the workers read the rest themselves.
                if file.read_exact_at(&mut buf[..n], off).is_err() {
                    break;
                }
                off += n as u64;
                sh.front.lock().unwrap_or_else(|p| p.into_inner()).done = off;
                sh.moved.notify_all();
            }
            sh.front.lock().unwrap_or_else(|p| p.into_inner()).finished = true;
            sh.moved.notify_all();
        });
        Ok(Readahead {
            shared,
            thread: Some(thread),
        })
    }

    /// Blocks until the bytes before `end` are in the page cache, or the
    /// reader has stopped.
    pub fn wait_for(&self, end: u64) {
        let mut f = self.shared.front.lock().unwrap_or_else(|p| p.into_inner());
        while f.done < end && !f.finished {
            f = self.shared.moved.wait(f).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for Readahead {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_pass_once_the_reader_is_past_them_or_done() {
        let p = std::env::temp_dir().join(format!("cnse-readahead-{}", std::process::id()));
        std::fs::write(&p, vec![7u8; 3 * READAHEAD_STEP_BYTES + 5]).unwrap();
        let r = Readahead::start(&p, u64::MAX).unwrap();
        r.wait_for(READAHEAD_STEP_BYTES as u64);
        r.wait_for(3 * READAHEAD_STEP_BYTES as u64 + 5);
        r.wait_for(u64::MAX); // past the end: returns once the reader finished
        drop(r);
        let r = Readahead::start(&p, 10).unwrap();
        r.wait_for(1 << 40);
        let _ = std::fs::remove_file(&p);
    }
}
