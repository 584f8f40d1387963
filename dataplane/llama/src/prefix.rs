//! The prefix index: which llama-server (and which of its slots) recently
//! served a prompt that begins like this one. Pure and shared by all cores.
//!
//! A prompt is cut into [`BLOCK_BYTES`]-byte blocks and each block gets a
//! *chained* hash (the hash of the block and of the previous block's hash),
//! so one 64-bit value stands for the whole prefix up to its block: a hit on
//! block `k` means this server was sent a prompt whose first `k + 1` blocks
//! were exactly these bytes. No tokens are needed (llama-server's cache is
//! a token prefix; a byte prefix of the same text tokenizes to the same
//! tokens up to the last block or so).
//!
//! Each server has one fixed-size table (allocated at start-up, never
//! grown): `entries` slots in buckets of [`WAYS`], each entry one `u64`
//! (the hash's high bits and the llama-server slot id) and one `u32` stamp.
//! Eviction is least-recently-stamped within the bucket: an insert updates
//! the entry with the same hash, else takes an empty way, else the way with
//! the oldest stamp (the server's insert counter when it was written).
//! Memory is `entries × 12` bytes per server whatever is sent.
//!
//! Entries are plain atomics without a lock: two cores writing one bucket
//! at once may lose one of the two writes, and a reader may see a fresh
//! hash with an older stamp. Every such race only costs a routing hint (a
//! request goes to a server whose cache does not hold its prefix, and is
//! prefilled there), never correctness.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bytes of prompt per indexed block (about 8 tokens of English): small
/// enough that what tells two conversations apart (a question of a few
/// dozen bytes) lands in a whole block.
pub const BLOCK_BYTES: usize = 32;
/// Blocks of one prompt that are indexed at most (the first 64 KiB):
/// beyond that, a longer common prefix does not change the choice.
pub const PROMPT_BLOCKS_MAX: usize = 2048;
/// Ways per bucket.
pub const WAYS: usize = 4;
/// Entries per server, default and bounds (`--llama-prefix-entries`).
pub const ENTRIES_DEFAULT: usize = 1 << 16;
pub const ENTRIES_MIN: usize = 64;
pub const ENTRIES_MAX: usize = 1 << 24;

/// Low bits of an entry: the llama-server slot id + 1 (0: none).
const SLOT_BITS: u32 = 12;
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;
/// Slot ids an entry can carry.
pub const SLOT_ID_MAX: usize = (1 << SLOT_BITS) - 2;

/// The chained block hashes of `prompt` (at most [`PROMPT_BLOCKS_MAX`],
/// whole blocks only) into `out` (cleared first; it keeps its capacity).
pub fn block_hashes(prompt: &[u8], out: &mut Vec<u64>) {
    out.clear();
    let mut h = CHAIN_SEED;
    for block in prompt.chunks_exact(BLOCK_BYTES).take(PROMPT_BLOCKS_MAX) {
        h = chain(h, block);
        out.push(h);
    }
}

const CHAIN_SEED: u64 = 0x6a09_e667_f3bc_c908;

/// The hash of a prefix ending with `block`, from the hash `h` of the
/// prefix before it.
fn chain(mut h: u64, block: &[u8]) -> u64 {
    debug_assert_eq!(block.len(), BLOCK_BYTES);
    for word in block.chunks_exact(8) {
        let w = u64::from_le_bytes(word.try_into().expect("chunks_exact(8) yields 8 bytes"));
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
    fmix64(h)
}

/// A stream's prefix as it grows: llama-server's slot holds the prompt
/// *and* the generated text, and the next turn of a conversation sends
/// both back, so the generated text is indexed too, block by block as it
/// arrives (fixed-size state, no allocation).
#[derive(Debug, Clone, Copy)]
pub struct Growing {
    h: u64,
    tail: [u8; BLOCK_BYTES],
    tail_len: usize,
    blocks: usize,
    slot: Option<u16>,
    active: bool,
}

impl Default for Growing {
    fn default() -> Self {
        Self {
            h: CHAIN_SEED,
            tail: [0; BLOCK_BYTES],
            tail_len: 0,
            blocks: 0,
            slot: None,
            active: false,
        }
    }
}

impl Growing {
    /// Starts from a prompt whose block hashes are `hashes` (as
    /// [`block_hashes`] wrote them), sent on `slot`.
    pub fn start(prompt: &[u8], hashes: &[u64], slot: Option<u16>) -> Self {
        let blocks = hashes.len();
        if blocks >= PROMPT_BLOCKS_MAX {
            return Self::default();
        }
        let rest = &prompt[blocks * BLOCK_BYTES..];
        debug_assert!(rest.len() < BLOCK_BYTES);
        let mut tail = [0; BLOCK_BYTES];
        tail[..rest.len()].copy_from_slice(rest);
        Self {
            h: hashes.last().copied().unwrap_or(CHAIN_SEED),
            tail,
            tail_len: rest.len(),
            blocks,
            slot,
            active: true,
        }
    }

    /// Appends generated text; each block it completes goes into `index`.
    pub fn extend(&mut self, mut text: &[u8], index: &PrefixIndex) {
        while self.active && !text.is_empty() {
            let n = (BLOCK_BYTES - self.tail_len).min(text.len());
            self.tail[self.tail_len..self.tail_len + n].copy_from_slice(&text[..n]);
            self.tail_len += n;
            text = &text[n..];
            if self.tail_len == BLOCK_BYTES {
                self.h = chain(self.h, &self.tail);
                index.insert(&[self.h], self.slot);
                self.tail_len = 0;
                self.blocks += 1;
                self.active = self.blocks < PROMPT_BLOCKS_MAX;
            }
        }
    }

    /// Stops indexing (the stream ended or went elsewhere).
    pub fn stop(&mut self) {
        self.active = false;
    }
}

/// The hash a session key stands for (distinct from block hashes' use only
/// by its input; a collision costs a routing hint).
pub fn session_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xbb67_ae85_84ca_a73b;
    for chunk in key.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
    fmix64(h ^ key.len() as u64)
}

/// The part of a hash an entry keeps; never 0 (0 is an empty entry).
fn high(hash: u64) -> u64 {
    (hash | 1 << 63) & !SLOT_MASK
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// One llama-server's table of recently sent prefixes.
pub struct PrefixIndex {
    keys: Box<[AtomicU64]>,
    stamps: Box<[AtomicU32]>,
    tick: AtomicU32,
    bucket_mask: usize,
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("entries", &self.keys.len())
            .finish()
    }
}

impl PrefixIndex {
    /// A table of `entries` (rounded up to a power of two, at least
    /// [`ENTRIES_MIN`], at most [`ENTRIES_MAX`]).
    pub fn new(entries: usize) -> Self {
        let entries = entries.clamp(ENTRIES_MIN, ENTRIES_MAX).next_power_of_two();
        let buckets = entries / WAYS;
        Self {
            keys: (0..entries).map(|_| AtomicU64::new(0)).collect(),
            stamps: (0..entries).map(|_| AtomicU32::new(0)).collect(),
            tick: AtomicU32::new(0),
            bucket_mask: buckets - 1,
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
        let b = (hash as usize >> SLOT_BITS) & self.bucket_mask;
        b * WAYS..(b + 1) * WAYS
    }

    /// The entry of `hash`: the slot id it was last sent to (`None` when
    /// sent without one), or `Err(())` when it is not in the table.
    #[allow(clippy::result_unit_err)]
    pub fn get(&self, hash: u64) -> Result<Option<u16>, ()> {
        let want = high(hash);
        for w in self.ways(hash) {
            let k = self.keys[w].load(Ordering::Relaxed);
            if k != 0 && k & !SLOT_MASK == want {
                let slot = (k & SLOT_MASK) as u16;
                return Ok(slot.checked_sub(1));
            }
        }
        Err(())
    }

    /// Blocks of `hashes` (a prompt's chained hashes) this server was sent,
    /// from the start without a gap, and the slot the last of them went to.
    pub fn matched(&self, hashes: &[u64]) -> (usize, Option<u16>) {
        let mut slot = None;
        for (k, &h) in hashes.iter().enumerate() {
            match self.get(h) {
                Ok(s) => slot = s,
                Err(()) => return (k, slot),
            }
        }
        (hashes.len(), slot)
    }

    /// Records that `hashes` were sent to this server (on `slot`).
    pub fn insert(&self, hashes: &[u64], slot: Option<u16>) {
        let stamp = self.tick.fetch_add(1, Ordering::Relaxed).wrapping_add(1).max(1);
        let slot_bits = slot.map_or(0, |s| {
            assert!(usize::from(s) <= SLOT_ID_MAX, "slot id {s} above {SLOT_ID_MAX}");
            u64::from(s) + 1
        });
        for &h in hashes {
            self.put(h, high(h) | slot_bits, stamp);
        }
    }

    fn put(&self, hash: u64, key: u64, stamp: u32) {
        crate::ways::put(&self.keys, &self.stamps, self.ways(hash), key, !SLOT_MASK, stamp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(s: &str) -> Vec<u64> {
        let mut v = Vec::new();
        block_hashes(s.as_bytes(), &mut v);
        v
    }

    #[test]
    fn a_prompt_and_its_extension_share_their_block_hashes() {
        let system = "You are a helpful assistant. ".repeat(20);
        let a = hashes(&format!("{system}User: hi\nAssistant:"));
        let b = hashes(&format!(
            "{system}User: hi\nAssistant: hello!\nUser: and now?\nAssistant:"
        ));
        let c = hashes(&format!("X{system}"));
        assert_eq!(a.len(), (system.len() + 19) / BLOCK_BYTES);
        assert_eq!(&b[..a.len()], &a[..]);
        assert!(
            c.iter().zip(&a).all(|(x, y)| x != y),
            "one byte more in front changes every block"
        );
        assert!(hashes(&"x".repeat(10 * BLOCK_BYTES * PROMPT_BLOCKS_MAX)).len() == PROMPT_BLOCKS_MAX);
        assert!(hashes("short").is_empty());
    }

    #[test]
    fn the_longest_prefix_and_its_slot_are_found() {
        let ix = PrefixIndex::new(1024);
        let system = "Answer briefly and politely. ".repeat(10);
        let turn1 = hashes(&format!("{system}User: what is Rust?\nAssistant:"));
        let turn2 = hashes(&format!(
            "{system}User: what is Rust?\nAssistant: a language.\nUser: who made it, and when exactly?\nAssistant:"
        ));
        assert_eq!(ix.matched(&turn2), (0, None));
        ix.insert(&turn1, Some(3));
        assert_eq!(ix.matched(&turn2), (turn1.len(), Some(3)));
        ix.insert(&turn2, Some(1));
        assert_eq!(ix.matched(&turn2), (turn2.len(), Some(1)));
        ix.insert(&turn1, None);
        assert_eq!(ix.matched(&turn1), (turn1.len(), None));
    }

    fn distinct_prompt(i: u32) -> String {
        let filler = "lorem ipsum dolor sit amet ".repeat(2 + i as usize % 9);
        format!("prompt {i:06}: {filler}")
    }

    /// Issue 14: the index stays within its bound however many distinct
    /// prompts go through it, and keeps the most recent ones.
    #[test]
    fn issue14_the_index_stays_within_its_bound_under_100000_distinct_prompts() {
        let ix = PrefixIndex::new(4096);
        let (capacity, bytes) = (ix.capacity(), ix.memory_bytes());
        assert_eq!(capacity, 4096);
        let mut v = Vec::with_capacity(PROMPT_BLOCKS_MAX);
        for i in 0..100_000u32 {
            block_hashes(distinct_prompt(i).as_bytes(), &mut v);
            assert!(!v.is_empty());
            ix.insert(&v, Some((i % 4) as u16));
            assert!(v.capacity() <= PROMPT_BLOCKS_MAX);
        }
        assert!(ix.len() <= capacity);
        assert!(ix.len() > capacity / 2, "the table is in use: {}", ix.len());
        assert_eq!((ix.capacity(), ix.memory_bytes()), (capacity, bytes));
        // The last prompt is still there; the first one is evicted.
        block_hashes(distinct_prompt(99_999).as_bytes(), &mut v);
        assert_eq!(ix.matched(&v), (v.len(), Some(3)));
        block_hashes(distinct_prompt(0).as_bytes(), &mut v);
        assert_eq!(ix.matched(&v).0, 0);
    }

    #[test]
    fn generated_text_extends_the_indexed_prefix() {
        let ix = PrefixIndex::new(1024);
        let prompt = format!("{}User: hi\nAssistant:", "System rules apply here. ".repeat(8));
        let answer = " Hello! How can I help you today? I can answer questions.";
        let v = hashes(&prompt);
        ix.insert(&v, Some(2));
        let mut g = Growing::start(prompt.as_bytes(), &v, Some(2));
        // Token by token, as llama-server streams it.
        for piece in answer.as_bytes().chunks(3) {
            g.extend(piece, &ix);
        }
        let next = hashes(&format!("{prompt}{answer}\nUser: thanks\nAssistant:"));
        let whole = (prompt.len() + answer.len()) / BLOCK_BYTES;
        assert!(whole > v.len());
        assert_eq!(ix.matched(&next), (whole, Some(2)));
    }

    #[test]
    fn sizes_are_bounded_and_session_hashes_differ() {
        assert_eq!(PrefixIndex::new(0).capacity(), ENTRIES_MIN);
        assert_eq!(PrefixIndex::new(1000).capacity(), 1024);
        assert_ne!(session_hash(b"alice"), session_hash(b"bob"));
        assert_ne!(session_hash(b"a"), session_hash(b"a\0"));
    }
}
