//! rkyv manifest access on arbitrary bytes (`Manifest::from_bytes`, the
//! path of a manifest fetched from a remote):
//! - never panics and never reads out of bounds (rkyv validates before any
//!   access; ASan runs check the rest);
//! - whatever it accepts is consistent: a known format, a legal chunk size,
//!   one digest per chunk and per leaf, accessors that do not panic;
//! - an accepted manifest re-encodes to one that is accepted with the same
//!   record, and is refused when a different digest is expected.
#![no_main]

use std::path::Path;

use cnse_store::{check_chunk_bytes, check_leaf_bytes, chunk_count, leaf_count, Manifest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let origin = Path::new("fuzz");
    let Ok(m) = Manifest::from_bytes(data, origin, None) else {
        return;
    };
    assert!((1..=3).contains(&m.format()));
    assert!(check_chunk_bytes(m.chunk_bytes()).is_ok());
    assert_eq!(m.chunk_count(), chunk_count(m.size_bytes(), m.chunk_bytes()));
    assert_eq!(m.chunk_digests().len() as u64, m.chunk_count());
    if let Some((leaf_bytes, leaves)) = m.leaves() {
        assert!(check_leaf_bytes(leaf_bytes, m.chunk_bytes()).is_ok());
        assert_eq!(leaves.len() as u64, leaf_count(m.size_bytes(), leaf_bytes));
    } else {
        assert!(m.format() < 3, "format 3 needs leaves");
    }
    let _ = (
        m.name().len(),
        m.created_unix_ms(),
        m.chunk_scheme(),
        m.gguf(),
        m.check_tree(),
    );

    let rec = m.record();
    let again = Manifest::from_bytes(&rec.encode(), origin, Some(&m.digest())).expect("a record it read re-encodes");
    assert_eq!(again.record(), rec);
    let mut other = m.digest();
    other.0[0] ^= 1;
    assert!(Manifest::from_bytes(&rec.encode(), origin, Some(&other)).is_err());
});
