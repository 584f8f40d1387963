//! The HELLO key check, in constant time whatever the lengths: both the
//! configured key and the offered one go through HMAC-SHA256 under a
//! per-process random key, and the tags are compared by `ring::hmac::verify`
//! (constant time). Neither an early return on a length mismatch nor a
//! byte-by-byte fold tells a client how much of its guess was right.

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// Key bytes that never print: `Debug` says only that a key is there, so
/// a `Config` in a log or a panic message does not carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// The key itself, for the one place that needs it (the HMAC).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

pub(crate) struct AuthKey {
    mac_key: hmac::Key,
    expected: hmac::Tag,
}

impl AuthKey {
    pub fn new(key: &[u8]) -> Self {
        let mut secret = [0u8; 32];
        SystemRandom::new()
            .fill(&mut secret)
            .expect("the system random source works");
        let mac_key = hmac::Key::new(hmac::HMAC_SHA256, &secret);
        let expected = hmac::sign(&mac_key, key);
        AuthKey { mac_key, expected }
    }

    /// The offered key equals the configured one.
    pub fn verify(&self, offered: &[u8]) -> bool {
        hmac::verify(&self.mac_key, offered, self.expected.as_ref()).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue11_a_config_never_prints_its_key() {
        let cfg = crate::Config {
            auth_key: Some(Secret::new(b"s3cret-key".to_vec())),
            ..crate::Config::default()
        };
        let text = format!("{cfg:?} {cfg:#?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(!text.contains("115, 51, 99"), "not as numbers either: {text}");
        assert!(text.contains("Secret(<redacted>)"), "{text}");
    }

    #[test]
    fn only_the_exact_key_passes() {
        let k = AuthKey::new(b"s3cret-key");
        assert!(k.verify(b"s3cret-key"));
        for bad in [&b""[..], b"s3cret-ke", b"s3cret-key ", b"S3cret-key", b"s3cret-kez"] {
            assert!(!k.verify(bad), "{bad:?} passed");
        }
    }
}
