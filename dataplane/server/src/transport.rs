//! What the session layer asks of the I/O layer. The worker implements it
//! with io_uring ops on its ring (`worker.rs`); the simulator in memory
//! (`sim/`). Every request completes later through one of the session's
//! `on_*` entry points, never inside the call.

use std::os::fd::RawFd;

use cnse_backend::Io;

/// A connection as the I/O layer knows it: its table slot, the slot's
/// generation (so a late completion for a previous owner is recognised)
/// and its socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnRef {
    pub slot: u32,
    pub gen: u32,
    pub fd: RawFd,
}

pub trait Transport: Io {
    /// Receives on the connection until told otherwise: each chunk arrives
    /// as `Session::on_input`, the end (EOF, error, ENOBUFS, cancel) as
    /// `Session::on_recv_done`.
    fn recv(&mut self, conn: ConnRef);

    /// Stops the connection's receive; it ends with ECANCELED.
    fn cancel_recv(&mut self, conn: ConnRef);

    /// Sends `data`; completes with `Session::on_send_done` (possibly
    /// short).
    ///
    /// # Safety
    /// `data` stays valid and unmodified until that completion.
    unsafe fn send(&mut self, conn: ConnRef, data: &[u8]);

    /// Shuts the socket both ways, so pending receives and sends complete.
    fn shutdown(&mut self, fd: RawFd);

    /// Closes the socket; no operation refers to it any more.
    fn close(&mut self, fd: RawFd);
}

/// One send a [`NoteIo`] was asked for.
#[derive(Debug)]
pub struct Sent {
    pub conn: ConnRef,
    pub len: usize,
    /// A copy of the bytes, with `NoteIo::keep_bytes` (else empty: no
    /// allocation).
    pub bytes: Vec<u8>,
}

/// A transport with no kernel behind it, for benchmarks and tests that
/// drive a `Session` by hand: every operation is accepted and none
/// completes by itself; each send is noted (its connection and length,
/// and its bytes when `keep_bytes`), and the driver completes it with
/// `Session::on_send_done`. The clock is `now`, set by the driver.
#[derive(Debug)]
pub struct NoteIo {
    pub now: std::time::Instant,
    pub keep_bytes: bool,
    pub sends: Vec<Sent>,
}

impl NoteIo {
    pub fn new(now: std::time::Instant, keep_bytes: bool) -> Self {
        Self {
            now,
            keep_bytes,
            sends: Vec::new(),
        }
    }
}

impl Io for NoteIo {
    fn now(&self) -> std::time::Instant {
        self.now
    }

    unsafe fn submit(&mut self, _tag: u64, _entry: cnse_ring::squeue::Entry) {
        panic!("NoteIo runs no ring operations (a backend that submits needs a ring)");
    }
}

impl Transport for NoteIo {
    fn recv(&mut self, _conn: ConnRef) {}

    fn cancel_recv(&mut self, _conn: ConnRef) {}

    unsafe fn send(&mut self, conn: ConnRef, data: &[u8]) {
        let bytes = if self.keep_bytes { data.to_vec() } else { Vec::new() };
        self.sends.push(Sent {
            conn,
            len: data.len(),
            bytes,
        });
    }

    fn shutdown(&mut self, _fd: RawFd) {}

    fn close(&mut self, _fd: RawFd) {}
}
