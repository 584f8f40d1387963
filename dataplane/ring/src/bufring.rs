//! Provided-buffer ring (IORING_REGISTER_PBUF_RING): receive buffers the
//! kernel picks from for multishot recv, so a connection that is idle holds
//! no buffer at all. One ring per worker, shared by every connection of it.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use crate::Ring;
use io_uring::types::BufRingEntry;

/// Anonymous private mapping, freed on drop.
pub(crate) struct Mapping {
    pub(crate) ptr: *mut u8,
    len: usize,
}

impl Mapping {
    pub(crate) fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping with no address hint touches
        // no existing memory; the result is checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { ptr: ptr.cast(), len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; nothing borrows the
        // mapping past the owner's drop (the ring is unregistered first).
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    count: u16,
    buf_bytes: u32,
    bgid: u16,
    /// Our copy of the tail; published to the kernel with a release store.
    tail: u16,
}

impl BufRing {
    /// Registers `count` (power of two, <= 32768) buffers of `buf_bytes`
    /// each with `ring` under group `bgid` and hands all of them to the
    /// kernel.
    pub fn new(ring: &Ring, bgid: u16, count: u16, buf_bytes: u32) -> io::Result<Self> {
        assert!(
            count.is_power_of_two() && count <= 32768,
            "buffer count must be a power of two <= 32768"
        );
        assert!(buf_bytes > 0);
        let page = 4096;
        let entries_len = (usize::from(count) * std::mem::size_of::<BufRingEntry>()).div_ceil(page) * page;
        let entries = Mapping::new(entries_len)?;
        let buffers = Mapping::new(usize::from(count) * buf_bytes as usize)?;
        // SAFETY: `entries` is page-aligned, zeroed and large enough for
        // `count` entries; it outlives the registration (Drop unregisters
        // before unmapping, see `unregister`).
        unsafe {
            ring.raw()
                .submitter()
                .register_buf_ring_with_flags(entries.ptr as u64, count, bgid, 0)?
        };
        let mut this = Self {
            entries,
            buffers,
            count,
            buf_bytes,
            bgid,
            tail: 0,
        };
        for bid in 0..count {
            this.push(bid);
        }
        this.publish();
        Ok(this)
    }

    /// The first `len` bytes of buffer `bid`, filled by a completed recv.
    pub fn get(&self, bid: u16, len: usize) -> &[u8] {
        assert!(bid < self.count && len <= self.buf_bytes as usize);
        // SAFETY: the buffer lies inside `buffers`; the kernel wrote `len`
        // bytes into it and handed it to us in a CQE, so it does not touch
        // it again until we give it back with `recycle`.
        unsafe { std::slice::from_raw_parts(self.buffers.ptr.add(usize::from(bid) * self.buf_bytes as usize), len) }
    }

    /// Gives buffer `bid` back to the kernel (visible after `publish`).
    pub fn recycle(&mut self, bid: u16) {
        self.push(bid);
    }

    fn push(&mut self, bid: u16) {
        let mask = self.count - 1;
        let slot = usize::from(self.tail & mask);
        // SAFETY: slot < count, inside the entries mapping; the kernel only
        // reads entries between its head and our published tail, and this
        // slot is beyond the published tail.
        let entry = unsafe { &mut *(self.entries.ptr as *mut BufRingEntry).add(slot) };
        // SAFETY: bid < count, so the address is inside `buffers`.
        let addr = unsafe { self.buffers.ptr.add(usize::from(bid) * self.buf_bytes as usize) };
        entry.set_addr(addr as u64);
        entry.set_len(self.buf_bytes);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every recycled buffer visible to the kernel.
    pub fn publish(&mut self) {
        // SAFETY: the tail field lives in the first entry of the mapping,
        // which is 2-byte aligned; the kernel reads it atomically.
        let tail = unsafe { &*(BufRingEntry::tail(self.entries.ptr as *const BufRingEntry) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }

    /// Must be called before drop while the ring is still alive.
    pub fn unregister(&self, ring: &Ring) {
        let _ = ring.raw().submitter().unregister_buf_ring(self.bgid);
    }
}
