//! Read-ahead for cold loads. One thread reads the blob in file order with
//! large `pread`s (what `dd` does: the disk sees one sequential stream),
//! which fills the page cache; the load's workers wait at each chunk until
//! the reader has passed its end (`wait_for`), so they only ever touch
//! cached pages instead of faulting 16 scattered streams in from the disk.
//! Steps already in the page cache (`mincore`) are passed without reading,
//! so a warm blob costs the reader page-cache lookups, not a copy.

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
        let (file, len) = crate::stream::open_with_len(path, "open for read-ahead", "stat for read-ahead")?;
        let len = len.min(limit_bytes);
        let shared = Arc::new(Shared {
            front: Mutex::new(Front::default()),
            moved: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        // Doubles the kernel's read-ahead window for this file (advice
        // only, so its result is not checked).
        // SAFETY: fadvise on an open descriptor has no memory effects.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        // Only asked which pages are resident (`mincore`), never read.
        // SAFETY: no byte is read through this mapping, so a truncation of
        // the file by another process cannot fault here (a SIGBUS needs an
        // access); the mapping lives as long as the reader thread.
        let map = (len > 0).then(|| unsafe { memmap2::Mmap::map(&file) }.ok()).flatten();
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let mut resident = vec![0u8; READAHEAD_STEP_BYTES.div_ceil(crate::stream::page_bytes() as usize)];
            let mut off = 0u64;
            while off < len && !sh.stop.load(Ordering::Relaxed) {
                let n = (READAHEAD_STEP_BYTES as u64).min(len - off) as usize;
                let cached = map
                    .as_ref()
                    .is_some_and(|m| in_page_cache(m, off as usize, n, &mut resident));
                if !cached {
                    buf.resize(READAHEAD_STEP_BYTES, 0);
                    // Advice only: on an error the workers read the rest themselves.
                    if file.read_exact_at(&mut buf[..n], off).is_err() {
                        break;
                    }
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

/// Whether every page of `map[off..off + len]` is in the page cache.
/// `off` is a multiple of `READAHEAD_STEP_BYTES`, hence of the page size;
/// `resident` holds a byte per page of a step.
fn in_page_cache(map: &memmap2::Mmap, off: usize, len: usize, resident: &mut [u8]) -> bool {
    let pages = len.div_ceil(crate::stream::page_bytes() as usize);
    assert!(pages <= resident.len() && off + len <= map.len());
    // SAFETY: the range lies inside the live mapping and starts on a page
    // (asserted and documented above); `resident` has a byte for each of
    // its pages; mincore reads no byte of the file.
    let r = unsafe { libc::mincore(map.as_ptr().add(off) as *mut libc::c_void, len, resident.as_mut_ptr()) };
    r == 0 && resident[..pages].iter().all(|b| b & 1 == 1)
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
    use std::fs::File;

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

    #[test]
    fn resident_steps_are_told_from_dropped_ones() {
        let p = std::env::temp_dir().join(format!("cnse-readahead-mincore-{}", std::process::id()));
        std::fs::write(&p, vec![9u8; READAHEAD_STEP_BYTES + 4096]).unwrap();
        let f = File::open(&p).unwrap();
        // SAFETY: test file, not truncated while mapped; never read.
        let m = unsafe { memmap2::Mmap::map(&f) }.unwrap();
        let mut resident = vec![0u8; READAHEAD_STEP_BYTES / 4096 + 1];
        std::fs::read(&p).unwrap(); // every page cached now
        assert!(in_page_cache(&m, 0, READAHEAD_STEP_BYTES, &mut resident));
        assert!(in_page_cache(&m, READAHEAD_STEP_BYTES, 4096, &mut resident));
        f.sync_all().unwrap();
        // SAFETY: fadvise on an open descriptor has no memory effects.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if in_page_cache(&m, 0, READAHEAD_STEP_BYTES, &mut resident) {
            println!("skipped the dropped half: this file system keeps the pages (tmpfs?)");
        }
        let _ = std::fs::remove_file(&p);
    }
}
