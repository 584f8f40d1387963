//! user_data tags: what a completion belongs to, packed into 64 bits.
//!
//! Two layouts, both led by an 8-bit op kind:
//! - slot tags `[kind: 8][slot: 24][generation: 32]` for ops on a table
//!   entry (a connection): the generation tells a completion for a slot's
//!   previous owner from one for its current owner;
//! - wide tags `[kind: 8][value: 56]` for ops whose owner routes them itself
//!   (a backend's own ops).
//!
//! Kind 0 is the ring's own (teardown's cancel): a loop's op kinds are
//! declared with [`op_kinds!`], which checks at compile time that none is 0
//! and that all are distinct.

/// Bits of the op kind.
pub const KIND_BITS: u32 = 8;
/// Bits of a slot index.
pub const SLOT_BITS: u32 = 24;
/// Bits of a slot's generation.
pub const GEN_BITS: u32 = 32;
/// Bits of a wide tag's value.
pub const WIDE_BITS: u32 = 64 - KIND_BITS;
/// The largest slot index a tag can carry.
pub const SLOT_MAX: u32 = (1 << SLOT_BITS) - 1;
/// The largest value of a wide tag.
pub const WIDE_MAX: u64 = (1 << WIDE_BITS) - 1;
/// The kind the ring uses for its own operations.
pub const RING_KIND: u8 = 0;

const _: () = assert!(KIND_BITS + SLOT_BITS + GEN_BITS == 64);
const _: () = assert!(KIND_BITS + WIDE_BITS == 64);

/// A packed user_data value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag(u64);

impl Tag {
    /// A tag for an op on table slot `slot` of generation `gen`.
    ///
    /// Panics when `slot` exceeds [`SLOT_MAX`] (tables are sized below it
    /// at start-up: see [`Tag::check_slots`]).
    #[inline]
    pub const fn slot(kind: u8, slot: u32, gen: u32) -> Tag {
        assert!(slot <= SLOT_MAX, "slot index above 24 bits");
        Tag(((kind as u64) << (SLOT_BITS + GEN_BITS)) | ((slot as u64) << GEN_BITS) | gen as u64)
    }

    /// A tag carrying a 56-bit value chosen by the op's owner.
    ///
    /// Panics when `value` exceeds [`WIDE_MAX`].
    #[inline]
    pub const fn wide(kind: u8, value: u64) -> Tag {
        assert!(value <= WIDE_MAX, "wide tag value above 56 bits");
        Tag(((kind as u64) << WIDE_BITS) | value)
    }

    /// Checks at start-up that a table of `len` slots can be tagged.
    pub const fn check_slots(len: usize) -> bool {
        len <= SLOT_MAX as usize + 1
    }

    #[inline]
    pub const fn from_raw(raw: u64) -> Tag {
        Tag(raw)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    #[inline]
    pub const fn kind(self) -> u8 {
        (self.0 >> WIDE_BITS) as u8
    }

    /// The slot of a slot tag.
    #[inline]
    pub const fn slot_index(self) -> u32 {
        ((self.0 >> GEN_BITS) & SLOT_MAX as u64) as u32
    }

    /// The generation of a slot tag.
    #[inline]
    pub const fn gen(self) -> u32 {
        self.0 as u32
    }

    /// The value of a wide tag.
    #[inline]
    pub const fn wide_value(self) -> u64 {
        self.0 & WIDE_MAX
    }
}

/// Declares a loop's op kinds: a `#[repr(u8)]` enum with `code` and
/// `from_code`, checked at compile time to avoid the ring's kind 0 and to be
/// distinct.
///
/// ```
/// cnse_ring::op_kinds! {
///     /// Ops of a small loop.
///     pub enum Op { Accept = 1, Recv = 2 }
/// }
/// assert_eq!(Op::from_code(2), Some(Op::Recv));
/// assert_eq!(Op::Accept.code(), 1);
/// ```
#[macro_export]
macro_rules! op_kinds {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident = $value:expr),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        $vis enum $name { $($variant = $value),+ }

        impl $name {
            /// The kind's 8-bit code in a tag.
            #[inline]
            pub const fn code(self) -> u8 {
                self as u8
            }

            /// The kind a tag's code names, if any.
            #[inline]
            #[allow(dead_code)]
            pub const fn from_code(code: u8) -> Option<Self> {
                $(if code == $value { return Some($name::$variant); })+
                None
            }
        }

        const _: () = {
            let codes: &[u8] = &[$($value),+];
            let mut i = 0;
            while i < codes.len() {
                assert!(codes[i] != $crate::RING_KIND, "op kind 0 is the ring's own");
                let mut j = i + 1;
                while j < codes.len() {
                    assert!(codes[i] != codes[j], "op kinds must be distinct");
                    j += 1;
                }
                i += 1;
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_tags_round_trip() {
        for (kind, slot, gen) in [(1u8, 0u32, 0u32), (255, SLOT_MAX, u32::MAX), (7, 12345, 99)] {
            let t = Tag::slot(kind, slot, gen);
            assert_eq!((t.kind(), t.slot_index(), t.gen()), (kind, slot, gen));
            assert_eq!(Tag::from_raw(t.raw()), t);
        }
    }

    #[test]
    fn wide_tags_round_trip() {
        for (kind, v) in [(1u8, 0u64), (200, WIDE_MAX), (5, 0xdead_beef)] {
            let t = Tag::wide(kind, v);
            assert_eq!((t.kind(), t.wide_value()), (kind, v));
        }
    }

    #[test]
    #[should_panic(expected = "slot index above 24 bits")]
    fn a_slot_above_24_bits_is_refused() {
        let _ = Tag::slot(1, SLOT_MAX + 1, 0);
    }

    #[test]
    fn table_sizes_are_checked() {
        assert!(Tag::check_slots(1 << 24));
        assert!(!Tag::check_slots((1 << 24) + 1));
    }
}
