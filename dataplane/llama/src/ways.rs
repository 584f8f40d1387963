//! The bucket choice shared by the prefix index and the session table: a
//! table of `u64` keys (0: empty) with one `u32` stamp each, in buckets of
//! a few ways. An insert takes the way whose key matches (under a mask that
//! drops the payload bits), else an empty way, else the way with the oldest
//! stamp (least recently stamped within the bucket).
//!
//! Plain relaxed atomics without a lock: a race between two cores writing
//! one bucket may lose a write, which costs its table a routing hint, never
//! correctness.

use std::ops::Range;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// The way of bucket `ways` (indices into `keys` and `stamps`) that `key`
/// goes to with `stamp`: the way holding the same key under `match_mask`,
/// else the first empty way, else the first of the oldest stamped ways.
pub(crate) fn find_or_victim(
    keys: &[AtomicU64],
    stamps: &[AtomicU32],
    ways: Range<usize>,
    key: u64,
    match_mask: u64,
    stamp: u32,
) -> usize {
    assert!(!ways.is_empty(), "a bucket has ways");
    assert!(ways.end <= keys.len() && keys.len() == stamps.len());
    let mut victim = None::<(usize, u32)>;
    for w in ways {
        let k = keys[w].load(Ordering::Relaxed);
        if k != 0 && k & match_mask == key & match_mask {
            return w;
        }
        // Age since the stamp; an empty way is the oldest of all.
        let age = if k == 0 {
            u32::MAX - 1
        } else {
            stamp.wrapping_sub(stamps[w].load(Ordering::Relaxed))
        };
        if victim.is_none_or(|(_, a)| age > a) {
            victim = Some((w, age));
        }
    }
    victim.expect("a bucket has ways").0
}

/// Writes `key` with `stamp` into the way [`find_or_victim`] picks.
pub(crate) fn put(keys: &[AtomicU64], stamps: &[AtomicU32], ways: Range<usize>, key: u64, match_mask: u64, stamp: u32) {
    let w = find_or_victim(keys, stamps, ways, key, match_mask, stamp);
    keys[w].store(key, Ordering::Relaxed);
    stamps[w].store(stamp, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: u64 = !0xff;

    /// One bucket of four ways holding `keys` with `stamps`.
    fn bucket(keys: [u64; 4], stamps: [u32; 4]) -> (Vec<AtomicU64>, Vec<AtomicU32>) {
        (
            keys.into_iter().map(AtomicU64::new).collect(),
            stamps.into_iter().map(AtomicU32::new).collect(),
        )
    }

    #[test]
    fn a_matching_way_wins_over_older_and_empty_ways() {
        // Way 3 holds the key (other payload bits); way 0 is older, way 1 empty.
        let (k, s) = bucket([0x100, 0, 0x300, 0x4ab], [1, 0, 40, 50]);
        assert_eq!(find_or_victim(&k, &s, 0..4, 0x4cd, MASK, 60), 3);
        put(&k, &s, 0..4, 0x4cd, MASK, 60);
        assert_eq!(
            (k[3].load(Ordering::Relaxed), s[3].load(Ordering::Relaxed)),
            (0x4cd, 60)
        );
        assert_eq!(k[1].load(Ordering::Relaxed), 0, "nothing else written");
    }

    #[test]
    fn an_empty_way_is_preferred_over_any_filled_one() {
        // Way 0 is very old (stamp 1 of 1,000,000), yet the empty way 2 is taken.
        let (k, s) = bucket([0x100, 0x200, 0, 0x400], [1, 999_990, 0, 999_999]);
        assert_eq!(find_or_victim(&k, &s, 0..4, 0x900, MASK, 1_000_000), 2);
        // The first of several empty ways.
        let (k, s) = bucket([0x100, 0, 0, 0], [5, 0, 0, 0]);
        assert_eq!(find_or_victim(&k, &s, 0..4, 0x900, MASK, 6), 1);
    }

    #[test]
    fn the_oldest_filled_way_is_chosen_otherwise() {
        let (k, s) = bucket([0x100, 0x200, 0x300, 0x400], [30, 10, 20, 40]);
        assert_eq!(find_or_victim(&k, &s, 0..4, 0x900, MASK, 41), 1);
        // Ages count across the stamp counter's wrap: way 2 (stamped just
        // before the wrap) is the oldest.
        let (k, s) = bucket([0x100, 0x200, 0x300, 0x400], [3, 1, u32::MAX - 2, 2]);
        assert_eq!(find_or_victim(&k, &s, 0..4, 0x900, MASK, 4), 2);
        // Only the bucket's ways are looked at.
        let (k, s) = bucket([0x100, 0x200, 0x300, 0x400], [1, 2, 3, 4]);
        assert_eq!(find_or_victim(&k, &s, 2..4, 0x900, MASK, 5), 2);
    }
}
