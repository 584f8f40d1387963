//! The synthetic backend's index from a [`WorkId`] to its work's slot, for
//! the calls that name work by id (cancel, pause, resume).
//!
//! The loop packs a stream's slot in its table into the id's low half, so
//! the ids of live work are, in practice, small distinct numbers there: a
//! table indexed by the low half finds them with one load and no hashing.
//! Ids whose low half is large (work run for another core) or taken by
//! other live work go to a hash map. Every answer is checked against the
//! work's own id, so the index is right for any ids.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::WorkId;

/// Low halves below this are indexed directly (the table grows to the
/// largest seen: 4 bytes per stream slot).
const DIRECT_MAX: usize = 1 << 20;
const NONE: u32 = u32::MAX;

/// Hashes a [`WorkId`] (a slot and a generation the loop packs into a
/// u64) with one multiply: the index sees no untrusted keys, and SipHash
/// was a tenth of the backend's time at 4,096 streams.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

#[derive(Default)]
pub(super) struct WorkIndex {
    /// Work slot by the id's low half, `NONE` where none.
    direct: Vec<u32>,
    /// The ids `direct` cannot hold.
    others: HashMap<WorkId, u32, BuildHasherDefault<IdHasher>>,
}

fn low(id: WorkId) -> usize {
    id.0 as u32 as usize
}

impl WorkIndex {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            direct: Vec::with_capacity(n.min(DIRECT_MAX)),
            others: HashMap::default(),
        }
    }

    /// Indexes `id` at `slot`; `id_of` gives the id of the work at a slot
    /// (to tell whether a direct entry is still that work's).
    pub fn insert(&mut self, id: WorkId, slot: u32, id_of: impl Fn(u32) -> WorkId) {
        let k = low(id);
        if k < DIRECT_MAX {
            if self.direct.len() <= k {
                self.direct.resize(k + 1, NONE);
            }
            let held = self.direct[k];
            if held == NONE || id_of(held) == id {
                self.direct[k] = slot;
                return;
            }
        }
        self.others.insert(id, slot);
    }

    pub fn get(&self, id: WorkId, id_of: impl Fn(u32) -> WorkId) -> Option<u32> {
        match self.direct.get(low(id)) {
            Some(&slot) if slot != NONE && id_of(slot) == id => Some(slot),
            _ => self.others.get(&id).copied(),
        }
    }

    /// Forgets `id`, which is indexed at `slot`.
    pub fn remove(&mut self, id: WorkId, slot: u32) {
        match self.direct.get_mut(low(id)) {
            Some(held) if *held == slot => *held = NONE,
            _ => {
                self.others.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids as the loop makes them, ids of foreign work (a high low half)
    /// and ids that share a low half while both live: each is found at
    /// its own slot until removed, and no removed id is found.
    #[test]
    fn every_live_id_is_found_at_its_slot_and_no_other() {
        let ids: Vec<WorkId> = (0..64u64)
            .map(|i| WorkId((7 << 32) | i))
            .chain((0..16u64).map(|i| WorkId((3 << 32) | (1 << 31) | i)))
            .chain((0..16u64).map(|i| WorkId((9 << 32) | i)))
            .collect();
        let id_of = |slot: u32| ids[slot as usize];
        let mut index = WorkIndex::with_capacity(8);
        for (slot, &id) in ids.iter().enumerate() {
            index.insert(id, slot as u32, id_of);
        }
        for (slot, &id) in ids.iter().enumerate() {
            assert_eq!(index.get(id, id_of), Some(slot as u32), "{id:?}");
        }
        assert!(index.direct.len() <= 64, "foreign ids stay out of the table");
        // Remove every other id, in the order that leaves a low half's
        // second holder after its first is gone.
        for (slot, &id) in ids.iter().enumerate().step_by(2) {
            index.remove(id, slot as u32);
        }
        for (slot, &id) in ids.iter().enumerate() {
            let want = (slot % 2 == 1).then_some(slot as u32);
            assert_eq!(index.get(id, id_of), want, "{id:?}");
        }
        assert_eq!(index.get(WorkId(5 << 32), id_of), None, "an id never indexed");
    }
}
