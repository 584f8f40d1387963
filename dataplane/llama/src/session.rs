//! The session table (issue 14, `--llama-route session`): which llama-server
//! (and which of its slots) each session key's conversation is pinned to.
//! Pure and shared by all cores, like the prefix index.
//!
//! One fixed-size table for all servers (allocated at start-up, never
//! grown): `entries` in buckets of [`WAYS`], each entry one `u64` (the key's
//! hash, high bits, with the server and slot packed into the low
//! [`LOW_BITS`]) and one `u32` stamp. Every routed request of a session
//! writes its entry again with a fresh stamp, so eviction, when a bucket is
//! full, takes the least recently used entry of that bucket (LRU within
//! the bucket). Memory is `entries × 12` bytes whatever is sent.
//!
//! Entries are plain atomics without a lock: a race between two cores
//! writing one bucket may lose a pin, which costs a routing hint (the next
//! turn is routed by prefix, and pinned again where it lands), never
//! correctness.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Ways per bucket.
pub const WAYS: usize = 4;
/// Entries of the table, default and bounds (`--llama-session-entries`).
pub const ENTRIES_DEFAULT: usize = 1 << 16;
pub const ENTRIES_MIN: usize = 64;
pub const ENTRIES_MAX: usize = 1 << 24;

/// Low bits of an entry: slot id + 1 (12 bits, 0: none), then server
/// index + 1 (8 bits).
const SLOT_BITS: u32 = 12;
const SERVER_BITS: u32 = 8;
const LOW_BITS: u32 = SLOT_BITS + SERVER_BITS;
const LOW_MASK: u64 = (1 << LOW_BITS) - 1;
/// Servers and slot ids an entry can name.
pub const SERVERS_MAX: usize = (1 << SERVER_BITS) - 1;
pub const SLOT_ID_MAX: usize = (1 << SLOT_BITS) - 2;
const _: () = assert!(crate::URLS_MAX <= SERVERS_MAX);

/// Where a session is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pin {
    /// The server's index (URL order).
    pub server: usize,
    /// The llama-server slot its last turn went to, when one was named.
    pub slot: Option<u16>,
}

/// Session key hash → [`Pin`], bounded.
pub struct SessionTable {
    keys: Box<[AtomicU64]>,
    stamps: Box<[AtomicU32]>,
    tick: AtomicU32,
    bucket_mask: usize,
}

impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("entries", &self.keys.len())
            .finish()
    }
}

/// The part of a hash an entry keeps; never 0 (0 is an empty entry).
fn high(hash: u64) -> u64 {
    (hash | 1 << 63) & !LOW_MASK
}

impl SessionTable {
    /// A table of `entries` (rounded up to a power of two, at least
    /// [`ENTRIES_MIN`], at most [`ENTRIES_MAX`]).
    pub fn new(entries: usize) -> Self {
        let entries = entries.clamp(ENTRIES_MIN, ENTRIES_MAX).next_power_of_two();
        Self {
            keys: (0..entries).map(|_| AtomicU64::new(0)).collect(),
            stamps: (0..entries).map(|_| AtomicU32::new(0)).collect(),
            tick: AtomicU32::new(0),
            bucket_mask: entries / WAYS - 1,
        }
    }

    /// Entries of the table (its bound).
    pub fn capacity(&self) -> usize {
        self.keys.len()
    }

    /// Entries in use (tests, stats: walks the table).
    pub fn len(&self) -> usize {
        self.keys.iter().filter(|k| k.load(Ordering::Relaxed) != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table holds, fixed at construction.
    pub fn memory_bytes(&self) -> usize {
        self.keys.len() * (std::mem::size_of::<AtomicU64>() + std::mem::size_of::<AtomicU32>())
    }

    fn ways(&self, hash: u64) -> std::ops::Range<usize> {
        let b = (hash >> LOW_BITS) as usize & self.bucket_mask;
        b * WAYS..(b + 1) * WAYS
    }

    /// Where the session of `hash` (`prefix::session_hash` of its key) is
    /// pinned, if anywhere.
    pub fn get(&self, hash: u64) -> Option<Pin> {
        let want = high(hash);
        self.ways(hash).find_map(|w| {
            let k = self.keys[w].load(Ordering::Relaxed);
            (k != 0 && k & !LOW_MASK == want).then(|| {
                let slot = (k & ((1 << SLOT_BITS) - 1)) as u16;
                let server = ((k >> SLOT_BITS) & ((1 << SERVER_BITS) - 1)) as usize;
                Pin {
                    server: server - 1,
                    slot: slot.checked_sub(1),
                }
            })
        })
    }

    /// Pins the session of `hash` to `pin` (a fresh stamp: it is the most
    /// recently used of its bucket).
    pub fn pin(&self, hash: u64, pin: Pin) {
        assert!(
            pin.server < SERVERS_MAX,
            "server index {} above {SERVERS_MAX}",
            pin.server
        );
        let slot_bits = pin.slot.map_or(0, |s| {
            assert!(usize::from(s) <= SLOT_ID_MAX, "slot id {s} above {SLOT_ID_MAX}");
            u64::from(s) + 1
        });
        let key = high(hash) | (pin.server as u64 + 1) << SLOT_BITS | slot_bits;
        let stamp = self.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1).max(1);
        crate::ways::put(&self.keys, &self.stamps, self.ways(hash), key, !LOW_MASK, stamp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::session_hash;

    #[test]
    fn a_pin_is_found_and_moved() {
        let t = SessionTable::new(1024);
        let (a, b) = (session_hash(b"alice"), session_hash(b"bob"));
        assert_eq!(t.get(a), None);
        t.pin(
            a,
            Pin {
                server: 2,
                slot: Some(3),
            },
        );
        t.pin(b, Pin { server: 0, slot: None });
        assert_eq!(
            t.get(a),
            Some(Pin {
                server: 2,
                slot: Some(3)
            })
        );
        assert_eq!(t.get(b), Some(Pin { server: 0, slot: None }));
        t.pin(
            a,
            Pin {
                server: 63,
                slot: Some(0),
            },
        );
        assert_eq!(
            t.get(a),
            Some(Pin {
                server: 63,
                slot: Some(0)
            })
        );
        assert_eq!(t.len(), 2);
    }

    /// Issue 14: the key table stays within its bound under 100,000
    /// distinct keys, keeps the most recent ones, and a key in use stays
    /// (it is pinned again on every turn: LRU within its bucket).
    #[test]
    fn issue14_the_session_table_stays_within_its_bound_under_100000_distinct_keys() {
        let t = SessionTable::new(4096);
        let (capacity, bytes) = (t.capacity(), t.memory_bytes());
        assert_eq!((capacity, bytes), (4096, 4096 * 12));
        let live = session_hash(b"a conversation that keeps talking");
        for i in 0..100_000u32 {
            let key = format!("session-{i:06}");
            t.pin(
                session_hash(key.as_bytes()),
                Pin {
                    server: (i % 3) as usize,
                    slot: Some((i % 4) as u16),
                },
            );
            if i % 64 == 0 {
                t.pin(
                    live,
                    Pin {
                        server: 1,
                        slot: Some(2),
                    },
                );
            }
        }
        assert!(t.len() <= capacity);
        assert!(t.len() > capacity / 2, "the table is in use: {}", t.len());
        assert_eq!((t.capacity(), t.memory_bytes()), (capacity, bytes));
        assert_eq!(
            t.get(session_hash(b"session-099999")),
            Some(Pin {
                server: 0,
                slot: Some(3)
            })
        );
        assert_eq!(t.get(session_hash(b"session-000000")), None);
        assert_eq!(
            t.get(live),
            Some(Pin {
                server: 1,
                slot: Some(2)
            })
        );
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(SessionTable::new(0).capacity(), ENTRIES_MIN);
        assert_eq!(SessionTable::new(1000).capacity(), 1024);
    }
}
