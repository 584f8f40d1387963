//! Admission gate: the counts every bound and the drain depend on, in one
//! atomic word, so that a push racing `close`, a claim racing the drain
//! check, and two pushes racing for the last slot each see one order.
//!
//! ```text
//!  bit 63    62..42     41..21     20..0
//!  closed    entries    live       running
//! ```
//!
//! - `live`: queued tasks that can still run (bounded by `queued_max`);
//! - `entries`: physical deque entries, live ones plus tombstones of tasks
//!   cancelled while queued (bounded by `entries_max`, so a client that
//!   pushes and cancels in a loop cannot grow the deques);
//! - `running`: claimed tasks not finished yet (local runs and tasks
//!   exported to another rank).

use crate::sync::{AtomicU64, Ordering};

const FIELD_BITS: u32 = 21;
const FIELD_MASK: u64 = (1 << FIELD_BITS) - 1;
const RUNNING_SHIFT: u32 = 0;
const LIVE_SHIFT: u32 = FIELD_BITS;
const ENTRIES_SHIFT: u32 = 2 * FIELD_BITS;
const CLOSED: u64 = 1 << 63;
/// Largest bound a field can hold.
pub const FIELD_MAX: usize = FIELD_MASK as usize;
const _: () = assert!(
    3 * FIELD_BITS <= 63,
    "the three fields and the closed bit fit in 64 bits"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Closed,
    Full,
}

/// A snapshot of the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GateCounts {
    pub closed: bool,
    pub live: usize,
    pub entries: usize,
    pub running: usize,
}

#[derive(Debug)]
pub(crate) struct Gate {
    word: AtomicU64,
    live_max: u64,
    entries_max: u64,
}

fn field(w: u64, shift: u32) -> u64 {
    (w >> shift) & FIELD_MASK
}

impl Gate {
    pub(crate) fn new(live_max: usize, entries_max: usize) -> Self {
        assert!(live_max >= 1 && live_max <= entries_max && entries_max <= FIELD_MAX);
        Self {
            word: AtomicU64::new(0),
            live_max: live_max as u64,
            entries_max: entries_max as u64,
        }
    }

    fn update(&self, f: impl FnMut(u64) -> Option<u64>) -> Result<u64, u64> {
        self.word.fetch_update(Ordering::AcqRel, Ordering::Acquire, f)
    }

    /// One more queued task, or why not.
    pub(crate) fn reserve(&self) -> Result<(), Refusal> {
        let mut why = Refusal::Full;
        let r = self.update(|w| {
            if w & CLOSED != 0 {
                why = Refusal::Closed;
                return None;
            }
            why = Refusal::Full;
            if field(w, LIVE_SHIFT) >= self.live_max || field(w, ENTRIES_SHIFT) >= self.entries_max {
                return None;
            }
            Some(w + (1 << LIVE_SHIFT) + (1 << ENTRIES_SHIFT))
        });
        r.map(|_| ()).map_err(|_| why)
    }

    fn sub(&self, delta: u64, add: u64, what: &str) {
        let prev = self.word.fetch_add(add.wrapping_sub(delta), Ordering::AcqRel);
        debug_assert!(
            prev.wrapping_add(add).wrapping_sub(delta) & CLOSED == prev & CLOSED,
            "gate underflow on {what}"
        );
    }

    /// A queued task was cancelled: no longer live, its entry stays as a
    /// tombstone until popped.
    pub(crate) fn cancelled(&self) {
        self.sub(1 << LIVE_SHIFT, 0, "cancelled");
    }

    /// A popped entry was claimed: live → running, the entry is gone.
    pub(crate) fn claimed(&self) {
        self.sub((1 << LIVE_SHIFT) + (1 << ENTRIES_SHIFT), 1 << RUNNING_SHIFT, "claimed");
    }

    /// A popped tombstone was dropped.
    pub(crate) fn tombstone_dropped(&self) {
        self.sub(1 << ENTRIES_SHIFT, 0, "tombstone");
    }

    /// A claimed task went back to the queue (running → live, one more
    /// entry). Not checked against the bounds: it held its place already;
    /// at most the exported tasks of one rank come back this way.
    pub(crate) fn unclaimed(&self) {
        self.word.fetch_add(
            (1 << LIVE_SHIFT) + (1 << ENTRIES_SHIFT) - (1 << RUNNING_SHIFT),
            Ordering::AcqRel,
        );
    }

    /// A running task finished.
    pub(crate) fn finished(&self) {
        self.sub(1 << RUNNING_SHIFT, 0, "finished");
    }

    pub(crate) fn close(&self) {
        self.word.fetch_or(CLOSED, Ordering::AcqRel);
    }

    pub(crate) fn counts(&self) -> GateCounts {
        let w = self.word.load(Ordering::Acquire);
        GateCounts {
            closed: w & CLOSED != 0,
            live: field(w, LIVE_SHIFT) as usize,
            entries: field(w, ENTRIES_SHIFT) as usize,
            running: field(w, RUNNING_SHIFT) as usize,
        }
    }

    /// Closed and nothing queued or running: every admitted task has ended.
    pub(crate) fn drained(&self) -> bool {
        let c = self.counts();
        c.closed && c.live == 0 && c.running == 0
    }
}

#[cfg(all(test, not(cnse_loom)))]
mod tests {
    use super::*;

    #[test]
    fn bounds_live_and_entries() {
        let g = Gate::new(2, 3);
        g.reserve().unwrap();
        g.reserve().unwrap();
        assert_eq!(g.reserve(), Err(Refusal::Full));
        g.cancelled(); // one tombstone, one live
        g.reserve().unwrap(); // live 2, entries 3
        g.cancelled();
        assert_eq!(g.reserve(), Err(Refusal::Full), "tombstones count against entries_max");
        g.tombstone_dropped();
        g.reserve().unwrap();
        let c = g.counts();
        assert_eq!((c.live, c.entries, c.running), (2, 3, 0));
        g.claimed();
        assert_eq!(g.counts().running, 1);
        g.close();
        assert_eq!(g.reserve(), Err(Refusal::Closed));
        assert!(!g.drained());
    }
}
