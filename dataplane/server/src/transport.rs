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
