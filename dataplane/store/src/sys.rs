//! Thin, checked wrappers over the few Linux calls std does not expose.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Starts writeback of a byte range without waiting for it, so that the
/// final fsync finds little left to do.
pub fn start_writeback(file: &File, off: u64, len: u64) {
    // SAFETY: plain syscall on an open fd. Failure only loses the head start;
    // the fsync that follows is what guarantees durability.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), off as i64, len as i64, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// fsyncs a directory so that a rename or unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[derive(Clone, Copy)]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// flock(2); `wait = false` returns `WouldBlock` instead of waiting.
pub fn flock(file: &File, kind: LockKind, wait: bool) -> io::Result<()> {
    let mut op = match kind {
        LockKind::Shared => libc::LOCK_SH,
        LockKind::Exclusive => libc::LOCK_EX,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: plain syscall on an open fd.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
