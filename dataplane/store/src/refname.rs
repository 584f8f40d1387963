//! `name:tag` references, validated so that a name can never escape the
//! store's `refs/` directory.

use std::fmt;
use std::str::FromStr;

use crate::error::StoreError;

/// Longest name and longest tag, in bytes.
pub const REF_PART_BYTES_MAX: usize = 128;
/// Tag used when a reference names no tag.
pub const TAG_DEFAULT: &str = "latest";

/// A validated `name:tag`. Both parts are 1..=128 bytes of `A-Z a-z 0-9 . _ -`
/// that do not start with `.` or `-`, so neither can be a path separator,
/// `.`/`..`, a hidden file or an option.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct RefName {
    name: String,
    tag: String,
}

impl RefName {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Builds a reference from its two parts, validating both.
    pub fn new(name: &str, tag: &str) -> Result<RefName, StoreError> {
        let full = format!("{name}:{tag}");
        check_part(name, &full, "name")?;
        check_part(tag, &full, "tag")?;
        Ok(RefName {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

fn check_part(part: &str, full: &str, what: &'static str) -> Result<(), StoreError> {
    let bad = |reason| {
        Err(StoreError::BadRef {
            input: full.to_string(),
            reason,
        })
    };
    if part.is_empty() {
        return bad(if what == "name" { "empty name" } else { "empty tag" });
    }
    if part.len() > REF_PART_BYTES_MAX {
        return bad("name or tag longer than 128 bytes");
    }
    if part.contains('\0') {
        return bad("contains a NUL byte");
    }
    if part.contains('/') || part.contains('\\') {
        return bad("contains a path separator");
    }
    if part.contains("..") {
        return bad("contains `..`");
    }
    if part.starts_with('.') || part.starts_with('-') {
        return bad("starts with `.` or `-`");
    }
    if !part
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return bad("only A-Z, a-z, 0-9, `.`, `_` and `-` are allowed");
    }
    Ok(())
}

impl FromStr for RefName {
    type Err = StoreError;

    /// Parses `name:tag`, or `name` meaning `name:latest`.
    fn from_str(s: &str) -> Result<RefName, StoreError> {
        match s.split_once(':') {
            Some((name, tag)) => {
                if tag.contains(':') {
                    return Err(StoreError::BadRef {
                        input: s.to_string(),
                        reason: "more than one `:`",
                    });
                }
                RefName::new(name, tag)
            }
            None => RefName::new(s, TAG_DEFAULT),
        }
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        let r: RefName = "smollm2-135m:q4_1".parse().unwrap();
        assert_eq!((r.name(), r.tag()), ("smollm2-135m", "q4_1"));
        assert_eq!("llama".parse::<RefName>().unwrap().to_string(), "llama:latest");
        assert_eq!(
            "Qwen2.5_7B:v1.0".parse::<RefName>().unwrap().to_string(),
            "Qwen2.5_7B:v1.0"
        );
    }

    #[test]
    fn rejects_slash_dotdot_nul_and_friends_issue_3() {
        for bad in [
            "a/b:c",
            "a:b/c",
            "../x:y",
            "x:..",
            "..:t",
            "a\0b:c",
            "a:b\0",
            "/abs:t",
            ".hidden:t",
            "-rf:t",
            "a:-t",
            ":t",
            "a:",
            "a:b:c",
            "a b:c",
            "ü:t",
            "a\\b:c",
            &"n".repeat(129),
        ] {
            assert!(bad.parse::<RefName>().is_err(), "{bad:?} accepted");
        }
    }
}
