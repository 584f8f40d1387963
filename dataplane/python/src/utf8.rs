//! Text of a stream assembled from TOKENS payloads. The page allows a
//! frame to end inside a multi-byte character (llama-server emits such
//! tokens), so the incomplete tail of one payload is carried into the next
//! and Python only ever sees whole characters. Bytes that can never become
//! a character are replaced by U+FFFD, as `bytes.decode(errors="replace")`.

/// Longest incomplete tail of a UTF-8 sequence: 3 bytes of a 4-byte one.
const CARRY_BYTES_MAX: usize = 3;

#[derive(Debug, Default)]
pub struct Utf8Carry {
    carry: [u8; CARRY_BYTES_MAX],
    carry_len: usize,
    /// Carried tail plus the next payload; used only when a frame split a
    /// character, and reused.
    joined: Vec<u8>,
}

impl Utf8Carry {
    /// Appends the text of `bytes` (after any carried tail) to `out`,
    /// keeping a trailing incomplete sequence for the next call.
    pub fn push(&mut self, bytes: &[u8], out: &mut String) {
        if self.carry_len == 0 {
            self.carry_len = decode_into(bytes, out, &mut self.carry);
            return;
        }
        let mut joined = std::mem::take(&mut self.joined);
        joined.clear();
        joined.extend_from_slice(&self.carry[..self.carry_len]);
        joined.extend_from_slice(bytes);
        self.carry_len = decode_into(&joined, out, &mut self.carry);
        self.joined = joined;
    }

    /// The stream ended: a carried tail will never complete.
    pub fn finish(&mut self, out: &mut String) {
        if self.carry_len > 0 {
            out.push(char::REPLACEMENT_CHARACTER);
            self.carry_len = 0;
        }
    }
}

/// Decodes `input` onto `out`; an incomplete sequence at its very end is
/// copied to `carry` and its length returned.
fn decode_into(mut input: &[u8], out: &mut String, carry: &mut [u8; CARRY_BYTES_MAX]) -> usize {
    loop {
        match std::str::from_utf8(input) {
            Ok(s) => {
                out.push_str(s);
                return 0;
            }
            Err(e) => {
                let (good, bad) = input.split_at(e.valid_up_to());
                // SAFETY: the first `valid_up_to` bytes were just checked as UTF-8.
                out.push_str(unsafe { std::str::from_utf8_unchecked(good) });
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        input = &bad[n..];
                    }
                    None => {
                        // `error_len() == None` means the input ended inside
                        // a sequence, which is at most 3 bytes long.
                        assert!(
                            bad.len() <= CARRY_BYTES_MAX,
                            "incomplete UTF-8 tail of {} bytes",
                            bad.len()
                        );
                        carry[..bad.len()].copy_from_slice(bad);
                        return bad.len();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(parts: &[&[u8]]) -> String {
        let mut c = Utf8Carry::default();
        let mut out = String::new();
        for p in parts {
            c.push(p, &mut out);
        }
        c.finish(&mut out);
        out
    }

    #[test]
    fn every_split_of_multibyte_text_gives_the_text() {
        let text = "Olá, 世界! 🦀 ok";
        let b = text.as_bytes();
        for i in 0..=b.len() {
            for j in i..=b.len() {
                assert_eq!(feed(&[&b[..i], &b[i..j], &b[j..]]), text, "split at {i}, {j}");
            }
        }
        // One byte per frame.
        let singles: Vec<&[u8]> = b.chunks(1).collect();
        assert_eq!(feed(&singles), text);
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(feed(&[b"a\xffb"]), "a\u{fffd}b");
        // A lead byte followed by a non-continuation across frames.
        assert_eq!(feed(&[b"a\xe4", b"b"]), "a\u{fffd}b");
        // A truncated character at the end of the stream.
        assert_eq!(feed(&[b"ok\xf0\x9f"]), "ok\u{fffd}");
        assert_eq!(feed(&[b"\xe4\xb8", b"\x96", b"\xff"]), "\u{4e16}\u{fffd}");
    }
}
