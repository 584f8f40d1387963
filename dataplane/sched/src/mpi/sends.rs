//! Non-blocking sends whose buffers outlive the call: each message is
//! leaked into a `'static` slice for MPI (`StaticScope`) and freed when its
//! request tests complete. The comm thread never blocks in a send, so two
//! ranks sending large batches to each other at once cannot deadlock, and a
//! rank that stopped receiving costs at most `SENDS_PER_PEER_MAX` buffers.

use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// Sends to one peer not yet completed; past it, sends to that peer wait
/// (the peer is slow or gone).
pub const SENDS_PER_PEER_MAX: usize = 64;

struct Pending {
    req: Request<'static, [u8], StaticScope>,
    buf: *mut [u8],
    to: usize,
}

pub struct Sends {
    pending: Vec<Pending>,
    per_peer: Vec<usize>,
}

impl Sends {
    pub fn new(ranks: usize) -> Self {
        Self {
            pending: Vec::new(),
            per_peer: vec![0; ranks],
        }
    }

    pub fn can_send(&self, to: usize) -> bool {
        self.per_peer[to] < SENDS_PER_PEER_MAX
    }

    /// Starts sending `bytes` to `to`. The caller checked `can_send`.
    pub fn send(&mut self, world: &SimpleCommunicator, to: usize, bytes: Vec<u8>) {
        debug_assert!(self.can_send(to));
        let buf: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        let ptr: *mut [u8] = buf;
        // SAFETY: `ptr` came from `Box::leak` just above and is only turned
        // back into a Box in `poll`, after MPI reported this request done;
        // until then nothing else reads or writes it.
        let shared: &'static [u8] = unsafe { &*ptr };
        let req = world.process_at_rank(to as i32).immediate_send(StaticScope, shared);
        self.per_peer[to] += 1;
        self.pending.push(Pending { req, buf: ptr, to });
    }

    /// Frees the buffers of completed sends.
    pub fn poll(&mut self) {
        let mut i = 0;
        while i < self.pending.len() {
            let p = self.pending.swap_remove(i);
            match p.req.test() {
                Ok(_) => {
                    // SAFETY: MPI completed the send, so it no longer reads
                    // the buffer, and `p.buf` is the pointer leaked in `send`
                    // for this request alone.
                    drop(unsafe { Box::from_raw(p.buf) });
                    self.per_peer[p.to] -= 1;
                }
                Err(req) => {
                    self.pending.push(Pending { req, ..p });
                    let last = self.pending.len() - 1;
                    self.pending.swap(i, last);
                    i += 1;
                }
            }
        }
    }

    /// Every send to a live peer has completed.
    pub fn settled(&self, live: impl Fn(usize) -> bool) -> bool {
        self.pending.iter().all(|p| !live(p.to))
    }

    /// At exit: requests to dead peers may never complete; their buffers
    /// stay leaked (MPI may still read them), at most `SENDS_PER_PEER_MAX`
    /// per dead peer.
    pub fn abandon(&mut self) {
        for p in self.pending.drain(..) {
            std::mem::forget(p.req);
        }
    }
}
