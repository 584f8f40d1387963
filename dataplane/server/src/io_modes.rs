//! The ablation switches of a worker's socket I/O (docs/BENCHMARKS.md,
//! "Issue 13"): how it receives (the provided-buffer ring, or a plain RECV
//! into a buffer of the connection's own) and how it sends (plain SEND, or
//! SEND_ZC, whose buffer stays the kernel's until its notification). The
//! defaults are what the server runs; the others exist to be measured.

use std::fmt;

/// How a worker receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecvMode {
    /// Multishot RECV with buffer select from the worker's provided-buffer
    /// ring: no connection holds a receive buffer while it waits.
    #[default]
    BufRing,
    /// One single-shot RECV at a time into the connection slot's own
    /// buffer (`recv_buffer_bytes`, allocated at the slot's first use and
    /// kept): one submission per received chunk.
    Plain,
}

/// How a worker sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SendMode {
    /// SEND: the kernel copies the bytes at submission.
    #[default]
    Plain,
    /// SEND_ZC: the kernel pins the pages and sends from them; the
    /// buffer is released by a second completion (the notification), and
    /// only then is the send reported done to the session.
    Zc,
}

impl fmt::Display for RecvMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecvMode::BufRing => "bufring",
            RecvMode::Plain => "plain",
        })
    }
}

impl fmt::Display for SendMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendMode::Plain => "plain",
            SendMode::Zc => "zc",
        })
    }
}

/// The receive buffers of `RecvMode::Plain`, one per connection slot. A
/// slot's buffer is written by the kernel only while that slot's RECV is
/// in flight; the session releases a slot only once its ops completed,
/// and teardown drains the ring before this is dropped.
pub(crate) struct PlainRecvBufs {
    bufs: Vec<Option<Box<[u8]>>>,
    buf_bytes: usize,
}

impl PlainRecvBufs {
    pub fn new(slots: usize, buf_bytes: usize) -> Self {
        assert!(buf_bytes > 0);
        let mut bufs = Vec::with_capacity(slots);
        bufs.resize_with(slots, || None);
        Self { bufs, buf_bytes }
    }

    /// Slot `slot`'s buffer, allocated on the slot's first use (at a
    /// connection's start, never per frame).
    pub fn get_mut(&mut self, slot: u32) -> &mut [u8] {
        let n = self.buf_bytes;
        self.bufs[slot as usize].get_or_insert_with(|| vec![0u8; n].into_boxed_slice())
    }

    /// Slot `slot`'s buffer after its RECV completed.
    pub fn take(&mut self, slot: u32) -> Box<[u8]> {
        self.bufs[slot as usize]
            .take()
            .expect("a completed RECV had its slot's buffer")
    }

    pub fn put(&mut self, slot: u32, buf: Box<[u8]>) {
        self.bufs[slot as usize] = Some(buf);
    }
}

/// SEND_ZC's first completion carries the result; the buffer is the
/// kernel's until the notification that follows. The result waits here,
/// per connection slot, for that notification.
pub(crate) struct ZcPending {
    results: Vec<Option<i32>>,
}

impl ZcPending {
    pub fn new(slots: usize) -> Self {
        Self {
            results: vec![None; slots],
        }
    }

    pub fn hold(&mut self, slot: u32, result: i32) {
        let prev = self.results[slot as usize].replace(result);
        debug_assert!(prev.is_none(), "one send per connection at a time");
    }

    pub fn release(&mut self, slot: u32) -> Option<i32> {
        self.results[slot as usize].take()
    }
}
