//! Registered (fixed) send buffers (IORING_REGISTER_BUFFERS): one region
//! per ring, mapped and pinned once, cut into `count` buffers of
//! `buf_bytes`, each its own registered index. A send names its buffer by
//! index, so the kernel neither looks up nor pins the user pages per send.
//! Buffers are lent out one per send and given back at its completion
//! (SEND) or its notification (SEND_ZC): a bounded free list, nothing
//! allocated after `new`.

use std::io;

use io_uring::{opcode, squeue, types};

use crate::bufring::Mapping;
use crate::Ring;

/// Most buffers one region is cut into (the kernel allows 16,384).
pub const FIXED_BUFS_MAX: u16 = 4096;

pub struct FixedBufs {
    region: Mapping,
    buf_bytes: usize,
    count: u16,
    /// Indices not lent out: a stack, preallocated to `count`.
    free: Vec<u16>,
}

impl FixedBufs {
    /// Maps `count` buffers of `buf_bytes` and registers them with `ring`
    /// as indices 0..count. The ring must have no other registered buffers.
    pub fn new(ring: &Ring, count: u16, buf_bytes: u32) -> io::Result<Self> {
        if count == 0 || count > FIXED_BUFS_MAX || buf_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fixed buffers: {count} x {buf_bytes} bytes (1..={FIXED_BUFS_MAX} buffers of > 0 bytes)"),
            ));
        }
        let buf_bytes = buf_bytes as usize;
        let region = Mapping::new(usize::from(count) * buf_bytes)?;
        let iovecs: Vec<libc::iovec> = (0..usize::from(count))
            .map(|i| libc::iovec {
                // SAFETY: i < count, so the offset lies inside the region.
                iov_base: unsafe { region.ptr.add(i * buf_bytes) }.cast(),
                iov_len: buf_bytes,
            })
            .collect();
        // SAFETY: every iovec lies inside `region`, which stays mapped until
        // this is dropped; `unregister` runs first (the owner's teardown),
        // and closing the ring unregisters too.
        unsafe { ring.raw().submitter().register_buffers(&iovecs)? };
        Ok(Self {
            region,
            buf_bytes,
            count,
            free: (0..count).rev().collect(),
        })
    }

    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// Lends a buffer out; `None` when all are lent.
    pub fn take(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Takes back a buffer lent by `take`, once the kernel is done with it.
    pub fn give_back(&mut self, index: u16) {
        assert!(index < self.count && self.free.len() < usize::from(self.count));
        self.free.push(index);
    }

    /// Buffer `index` to fill before its send.
    pub fn buf_mut(&mut self, index: u16) -> &mut [u8] {
        assert!(index < self.count);
        // SAFETY: the buffer lies inside the region; a lent buffer is
        // written only by its borrower, before its send is submitted.
        unsafe {
            std::slice::from_raw_parts_mut(self.region.ptr.add(usize::from(index) * self.buf_bytes), self.buf_bytes)
        }
    }

    /// WRITE_FIXED (`zc` false) or SEND_ZC of the first `len` bytes of
    /// buffer `index` on the socket `fd`.
    ///
    /// Plain SEND cannot name a registered buffer on the kernels measured
    /// (Linux 6.18 answers EINVAL to IORING_RECVSEND_FIXED_BUF on
    /// IORING_OP_SEND; only SEND_ZC takes it), so the plain fixed path is a
    /// write of the registered buffer to the socket: the socket's
    /// `write_iter` is `sendmsg` without flags, so a peer that is gone
    /// gives EPIPE and a SIGPIPE, which Rust programs ignore from start-up.
    ///
    /// # Safety
    /// The buffer stays lent (not given back, not rewritten) until the
    /// send's last completion.
    pub unsafe fn send(&self, fd: i32, index: u16, len: usize, zc: bool) -> squeue::Entry {
        assert!(index < self.count && len <= self.buf_bytes);
        // SAFETY: as in `buf_mut`, inside the region.
        let ptr = unsafe { self.region.ptr.add(usize::from(index) * self.buf_bytes) };
        if zc {
            opcode::SendZc::new(types::Fd(fd), ptr, len as u32)
                .buf_index(Some(index))
                .flags(libc::MSG_NOSIGNAL)
                .build()
        } else {
            opcode::WriteFixed::new(types::Fd(fd), ptr, len as u32, index).build()
        }
    }

    /// Must be called before drop while the ring is still alive, after its
    /// ops drained.
    pub fn unregister(&self, ring: &Ring) {
        let _ = ring.raw().submitter().unregister_buffers();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RingConfig;

    #[test]
    fn buffers_are_lent_and_given_back() {
        let ring = Ring::new(RingConfig::default()).unwrap();
        let mut f = FixedBufs::new(&ring, 3, 4096).unwrap();
        let (a, b, c) = (f.take().unwrap(), f.take().unwrap(), f.take().unwrap());
        assert_eq!((a, b, c), (0, 1, 2));
        assert!(f.take().is_none());
        f.give_back(b);
        assert_eq!(f.take(), Some(1));
        f.unregister(&ring);
        assert!(FixedBufs::new(&ring, 0, 4096).is_err());
        assert!(FixedBufs::new(&ring, FIXED_BUFS_MAX + 1, 4096).is_err());
    }

    #[test]
    fn fixed_sends_deliver_the_buffers_bytes() {
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        let mut f = FixedBufs::new(&ring, 2, 4096).unwrap();
        // TCP on loopback: SEND_ZC refuses AF_UNIX sockets (EOPNOTSUPP).
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let tx = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        for (k, zc) in [false, true].into_iter().enumerate() {
            let i = f.take().unwrap();
            let msg = format!("fixed send {k}");
            f.buf_mut(i)[..msg.len()].copy_from_slice(msg.as_bytes());
            // SAFETY: the buffer stays lent until the completions below.
            unsafe {
                ring.push(f.send(tx.as_raw_fd(), i, msg.len(), zc), crate::Tag::wide(1, k as u64))
                    .unwrap()
            };
            let mut out = Vec::new();
            let mut result = None;
            while ring.in_flight() > 0 {
                ring.turn(Some(std::time::Duration::from_secs(1)), &mut out).unwrap();
                for c in out.drain(..) {
                    if !crate::cqueue::notif(c.flags) {
                        result = Some(c.result);
                    }
                }
            }
            assert_eq!(result, Some(msg.len() as i32), "zc {zc}");
            let mut got = vec![0u8; msg.len()];
            rx.read_exact(&mut got).unwrap();
            assert_eq!(got, msg.as_bytes());
            f.give_back(i);
        }
        f.unregister(&ring);
    }
}
