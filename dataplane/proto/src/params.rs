use crate::{code, MAX_TOKENS_LIMIT_DEFAULT, PARAMS_BYTES};

/// Server-side limits applied to REQUEST parameters.
#[derive(Debug, Clone, Copy)]
pub struct ParamLimits {
    /// Largest `max_tokens` accepted (the page: at least 65,536 by default).
    pub max_tokens_limit: u32,
}

impl Default for ParamLimits {
    fn default() -> Self {
        Self {
            max_tokens_limit: MAX_TOKENS_LIMIT_DEFAULT,
        }
    }
}

/// The REQUEST parameter block (first 32 bytes of its payload), decoded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub priority: u32,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            priority: 0,
        }
    }
}

/// A decoded REQUEST payload: parameters and the prompt, borrowed in place.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub params: Params,
    pub prompt: &'a str,
}

/// `bytes` as text if it is valid UTF-8. Prompts are mostly ASCII, which
/// is checked a word at a time (std's validation walks a short prompt a
/// byte at a time: it was 4 % of a request's instructions).
pub(crate) fn utf8(bytes: &[u8]) -> Option<&str> {
    if bytes.is_ascii() {
        // SAFETY: ASCII bytes are valid UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(bytes) });
    }
    std::str::from_utf8(bytes).ok()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

impl Params {
    /// Decodes and range-checks a REQUEST payload. The error is the code and
    /// message of the ERROR sent on the request's own stream (the connection
    /// stays open).
    pub fn parse<'a>(payload: &'a [u8], limits: &ParamLimits) -> Result<Request<'a>, (u32, &'static str)> {
        let bad = |m| Err((code::BAD_REQUEST, m));
        if payload.len() < PARAMS_BYTES {
            return bad("request payload shorter than the 32-byte parameter block");
        }
        let (b, prompt) = payload.split_at(PARAMS_BYTES);
        let params = Params {
            max_tokens: u32_at(b, 0),
            temperature: f32::from_bits(u32_at(b, 4)),
            top_p: f32::from_bits(u32_at(b, 8)),
            top_k: u32_at(b, 12),
            seed: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            priority: u32_at(b, 24),
        };
        if u32_at(b, 28) != 0 {
            return bad("reserved parameter field must be 0");
        }
        if params.max_tokens == 0 {
            return bad("max_tokens must be > 0");
        }
        if params.max_tokens > limits.max_tokens_limit {
            return bad("max_tokens above the server's limit");
        }
        if !params.temperature.is_finite() || params.temperature < 0.0 {
            return bad("temperature must be finite and >= 0");
        }
        // NaN fails both comparisons, so it lands here too.
        if !(params.top_p > 0.0 && params.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        let Some(prompt) = utf8(prompt) else {
            return bad("prompt is not valid UTF-8");
        };
        Ok(Request { params, prompt })
    }

    /// Encodes the parameter block (clients and tests).
    pub fn encode(&self) -> [u8; PARAMS_BYTES] {
        let mut b = [0u8; PARAMS_BYTES];
        b[0..4].copy_from_slice(&self.max_tokens.to_le_bytes());
        b[4..8].copy_from_slice(&self.temperature.to_bits().to_le_bytes());
        b[8..12].copy_from_slice(&self.top_p.to_bits().to_le_bytes());
        b[12..16].copy_from_slice(&self.top_k.to_le_bytes());
        b[16..24].copy_from_slice(&self.seed.to_le_bytes());
        b[24..28].copy_from_slice(&self.priority.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(p: Params, prompt: &[u8]) -> Vec<u8> {
        let mut v = p.encode().to_vec();
        v.extend_from_slice(prompt);
        v
    }

    #[test]
    fn round_trip() {
        let p = Params {
            max_tokens: 7,
            temperature: 0.5,
            top_p: 0.9,
            top_k: 40,
            seed: 99,
            priority: 3,
        };
        let buf = payload(p, "héllo".as_bytes());
        let r = Params::parse(&buf, &ParamLimits::default()).unwrap();
        assert_eq!(r.params, p);
        assert_eq!(r.prompt, "héllo");
    }

    #[test]
    fn rejects_out_of_range() {
        let l = ParamLimits::default();
        let base = Params::default();
        let cases = [
            Params { max_tokens: 0, ..base },
            Params {
                max_tokens: l.max_tokens_limit + 1,
                ..base
            },
            Params {
                temperature: -0.1,
                ..base
            },
            Params {
                temperature: f32::NAN,
                ..base
            },
            Params {
                temperature: f32::INFINITY,
                ..base
            },
            Params { top_p: 0.0, ..base },
            Params { top_p: 1.01, ..base },
            Params {
                top_p: f32::NAN,
                ..base
            },
        ];
        for p in cases {
            assert_eq!(Params::parse(&payload(p, b"x"), &l).unwrap_err().0, 400, "{p:?}");
        }
        assert!(Params::parse(
            &payload(
                Params {
                    max_tokens: 65_536,
                    ..base
                },
                b""
            ),
            &l
        )
        .is_ok());
        let mut reserved = payload(base, b"");
        reserved[28] = 1;
        assert!(Params::parse(&reserved, &l).is_err());
        assert!(Params::parse(&payload(base, &[0xff, 0xfe]), &l).is_err());
        // Past the ASCII check's words: a bad byte after 40 good ones, a
        // cut multi-byte character, and long valid text of both kinds.
        let mut late = vec![b'a'; 40];
        late.push(0x80);
        assert!(Params::parse(&payload(base, &late), &l).is_err());
        assert!(Params::parse(&payload(base, &"ééé".as_bytes()[..5]), &l).is_err());
        for ok in ["a".repeat(100), "é".repeat(50) + "ascii tail"] {
            assert_eq!(Params::parse(&payload(base, ok.as_bytes()), &l).unwrap().prompt, ok);
        }
        assert!(Params::parse(&[0u8; 31], &l).is_err());
    }
}
