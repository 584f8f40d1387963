//! SHA-256 digests: the names of blobs.

use std::fmt;
use std::str::FromStr;

use crate::error::StoreError;

/// Bytes in a SHA-256 digest.
pub const DIGEST_BYTES: usize = 32;

/// A SHA-256 digest. Displays as `sha256:<64 lowercase hex>`; parses from that
/// form or from the bare 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; DIGEST_BYTES]);

impl Digest {
    /// The digest of zero bytes.
    pub const EMPTY: Digest = Digest([
        0xe3, 0xb0, 0xc4, 0x42, 0x98, 0xfc, 0x1c, 0x14, 0x9a, 0xfb, 0xf4, 0xc8, 0x99, 0x6f, 0xb9, 0x24, 0x27, 0xae,
        0x41, 0xe4, 0x64, 0x9b, 0x93, 0x4c, 0xa4, 0x95, 0x99, 0x1b, 0x78, 0x52, 0xb8, 0x55,
    ]);

    /// The 64 lowercase hex digits, without the `sha256:` prefix.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// SHA-256 of `bytes` in one call.
    pub fn of(bytes: &[u8]) -> Digest {
        from_ring(ring::digest::digest(&ring::digest::SHA256, bytes))
    }
}

pub(crate) fn from_ring(d: ring::digest::Digest) -> Digest {
    let mut out = [0u8; DIGEST_BYTES];
    out.copy_from_slice(d.as_ref());
    Digest(out)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = StoreError;

    fn from_str(input: &str) -> Result<Digest, StoreError> {
        let bad = |reason| StoreError::BadDigest {
            input: input.to_string(),
            reason,
        };
        let hex = input.strip_prefix("sha256:").unwrap_or(input);
        if hex.len() != DIGEST_BYTES * 2 {
            return Err(bad("expected 64 hex digits, optionally after `sha256:`"));
        }
        let mut out = [0u8; DIGEST_BYTES];
        for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
            let hi = hex_value(pair[0]).ok_or_else(|| bad("not a hex digit"))?;
            let lo = hex_value(pair[1]).ok_or_else(|| bad("not a hex digit"))?;
            out[i] = hi << 4 | lo;
        }
        Ok(Digest(out))
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_constant_matches_ring() {
        assert_eq!(Digest::of(b""), Digest::EMPTY);
    }

    #[test]
    fn display_and_parse_round_trip() {
        let d = Digest::of(b"abc");
        let s = d.to_string();
        assert_eq!(
            s,
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(s.parse::<Digest>().unwrap(), d);
        assert_eq!(d.hex().to_uppercase().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in ["", "sha256:", "sha256:abc", "md5:00", &"g".repeat(64), &"0".repeat(65)] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} accepted");
        }
    }
}
