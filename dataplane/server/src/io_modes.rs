//! The ablation switches of a worker's socket I/O (docs/BENCHMARKS.md,
//! "Issue 13"): how it receives (the provided-buffer ring, or a plain RECV
//! into a buffer of the connection's own) and how it sends (plain SEND, or
//! SEND_ZC, whose buffer stays the kernel's until its notification, each
//! from the session's own buffer or from a registered one). The defaults
//! are what the server runs; the others exist to be measured.

use std::fmt;
use std::io;

use cnse_ring::{opcode, squeue, types, FixedBufs, Ring};

use crate::transport::ConnRef;

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
    /// A registered (fixed) buffer written to the socket (WRITE_FIXED:
    /// plain SEND takes no registered buffer on Linux 6.18, see
    /// `cnse_ring::FixedBufs::send`): the bytes are staged into one of the
    /// worker's registered buffers, which the kernel reads without looking
    /// up and pinning user pages per send.
    Fixed,
    /// SEND_ZC from a registered buffer: as `Zc`, the pages pinned once at
    /// registration instead of per send.
    ZcFixed,
}

impl SendMode {
    /// SEND_ZC: the send is done at its notification.
    pub fn is_zc(self) -> bool {
        matches!(self, SendMode::Zc | SendMode::ZcFixed)
    }

    pub fn is_fixed(self) -> bool {
        matches!(self, SendMode::Fixed | SendMode::ZcFixed)
    }
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
            SendMode::Fixed => "fixed",
            SendMode::ZcFixed => "zc-fixed",
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

/// SEND or SEND_ZC of `data` from where it lies, without SIGPIPE.
pub(crate) fn send_entry(fd: i32, data: &[u8], zc: bool) -> squeue::Entry {
    if zc {
        opcode::SendZc::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    } else {
        opcode::Send::new(types::Fd(fd), data.as_ptr(), data.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
    }
}

/// No registered buffer lent to the slot.
const NONE: u16 = u16::MAX;

/// The registered send buffers of `SendMode::Fixed` and `ZcFixed`: one
/// lent per send in flight (a connection has at most one), given back at
/// its completion or notification. A send that finds none free goes out
/// from the session's buffer instead (`fallbacks`); nothing is allocated
/// per send.
pub(crate) struct FixedSend {
    bufs: Option<FixedBufs>,
    /// Per connection slot: the buffer its send in flight holds, or NONE.
    held: Vec<u16>,
    /// Sends that found every registered buffer lent.
    pub fallbacks: u64,
}

impl FixedSend {
    /// Registers `count` buffers of `buf_bytes` with `ring` when `mode` is
    /// a fixed one; nothing otherwise.
    pub fn new(ring: &Ring, mode: SendMode, slots: usize, count: u16, buf_bytes: u32) -> io::Result<Self> {
        if !mode.is_fixed() {
            return Ok(Self {
                bufs: None,
                held: Vec::new(),
                fallbacks: 0,
            });
        }
        Ok(Self {
            bufs: Some(FixedBufs::new(ring, count, buf_bytes)?),
            held: vec![NONE; slots],
            fallbacks: 0,
        })
    }

    /// The send of `data` on `c`: its first bytes (up to a buffer's size;
    /// the session sends the rest after this short send completes) copied
    /// into a lent registered buffer, or `data` itself when none is free.
    ///
    /// # Safety
    /// As `Transport::send`: `data` stays in place until the completion
    /// (it is sent from directly when no buffer is free).
    pub unsafe fn entry(&mut self, c: ConnRef, data: &[u8], zc: bool) -> squeue::Entry {
        let bufs = self.bufs.as_mut().expect("fixed send modes register their buffers");
        let Some(index) = bufs.take() else {
            self.fallbacks += 1;
            return send_entry(c.fd, data, zc);
        };
        debug_assert_eq!(self.held[c.slot as usize], NONE, "one send per connection at a time");
        self.held[c.slot as usize] = index;
        let n = data.len().min(bufs.buf_bytes());
        bufs.buf_mut(index)[..n].copy_from_slice(&data[..n]);
        // SAFETY: the buffer stays lent to the slot until `release`, which
        // the worker calls at the send's last completion.
        unsafe { bufs.send(c.fd, index, n, zc) }
    }

    /// The slot's send is over (its last completion): its buffer goes back.
    pub fn release(&mut self, slot: u32) {
        let Some(bufs) = self.bufs.as_mut() else {
            return;
        };
        let index = std::mem::replace(&mut self.held[slot as usize], NONE);
        if index != NONE {
            bufs.give_back(index);
        }
    }

    /// After teardown drained the ring.
    pub fn unregister(&self, ring: &Ring) {
        if let Some(bufs) = &self.bufs {
            bufs.unregister(ring);
        }
    }
}
