//! The synthetic backend's text model: the word list, the hash picker and
//! the text a (prompt, seed) produces. Pure: no clock, no I/O.

use std::sync::OnceLock;

/// One token to choose: the stream's seed (mixed with its prompt), the
/// token's position and the sampling parameters of the request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PickRow {
    pub seed: u64,
    pub position: u64,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
}

/// Consecutive tokens of one stream to choose: `tokens` rows like `first`
/// at positions `first.position`, `first.position + 1`, ... A stream's
/// tokens of a loop turn are one run, so building a batch costs a run per
/// stream, not a row per token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PickRun {
    pub first: PickRow,
    pub tokens: u32,
}

impl PickRun {
    /// The run's rows, one per token, in order.
    pub fn rows(&self) -> impl Iterator<Item = PickRow> + '_ {
        (0..u64::from(self.tokens)).map(|k| PickRow {
            position: self.first.position + k,
            ..self.first
        })
    }
}

/// Chooses token ids for a batch of runs (one picker per core).
pub trait Picker {
    fn name(&self) -> &str;
    /// Fills `out` with the token ids of `runs`' rows in order (as many as
    /// their tokens together); ids are taken modulo the vocabulary.
    fn pick(&mut self, runs: &[PickRun], out: &mut [u32]) -> Result<(), String>;

    /// Tokens the backend hands it per call at most (one stream's run may
    /// be longer, alone in its call); the tokens of one call go out before
    /// the next call's runs are built, so the backend's id buffer is this
    /// size. Default: every token due in a loop turn in one call.
    fn batch_rows(&self) -> usize {
        usize::MAX
    }
}

/// Builds one picker per core (on that core's thread).
pub trait PickerFactory: Send + Sync {
    fn build(&self, core: usize) -> Result<Box<dyn Picker>, String>;
}

/// The default picker: a counter-based hash, no sampling.
pub struct HashPicker;

impl Picker for HashPicker {
    fn name(&self) -> &str {
        "cpu-hash"
    }

    /// A call costs nothing of its own: batches small enough that their
    /// rows and ids stay in L1 while their tokens are delivered.
    fn batch_rows(&self) -> usize {
        256
    }

    fn pick(&mut self, runs: &[PickRun], out: &mut [u32]) -> Result<(), String> {
        let mut at = 0;
        for run in runs {
            let n = run.tokens as usize;
            for (k, o) in out[at..at + n].iter_mut().enumerate() {
                *o = hash_pick(run.first.seed, run.first.position + k as u64);
            }
            at += n;
        }
        Ok(())
    }
}

/// The hash picker's token at `position` of the stream seeded `seed`.
fn hash_pick(seed: u64, position: u64) -> u32 {
    (splitmix64(seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 32) as u32
}

/// The word list tokens are drawn from: built from syllables so the text
/// reads like words, plus a few multi-byte UTF-8 words.
pub struct Vocab {
    /// Each word in a slot of its own, its length in the last byte: what
    /// [`WordRun`] copies whole (one fixed-size move per token, where a
    /// slice copy of the word's own length is a call to `memmove`).
    slots: Box<[[u8; WORD_SLOT]; Vocab::SIZE]>,
}

/// Bytes of a word's slot in [`Vocab`]; every word is shorter.
const WORD_SLOT: usize = 32;

impl Vocab {
    pub const SIZE: usize = 4096;

    pub fn new() -> Self {
        const ONSETS: [&str; 16] = [
            "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st",
        ];
        const VOWELS: [&str; 8] = ["a", "e", "i", "o", "u", "ai", "ou", "ea"];
        const CODAS: [&str; 8] = ["", "n", "r", "s", "t", "l", "nd", "ck"];
        const SPECIAL: [&str; 8] = [" café", " naïve", " über", " 日本", " ünïcode", ",", ".", " —"];
        let mut slots = Box::new([[0u8; WORD_SLOT]; Self::SIZE]);
        let mut word = Vec::with_capacity(WORD_SLOT);
        for (i, slot) in slots.iter_mut().enumerate() {
            word.clear();
            if i % 512 < SPECIAL.len() {
                word.extend_from_slice(SPECIAL[i % 512].as_bytes());
            } else {
                let mut h = splitmix64(i as u64);
                word.push(b' ');
                for _ in 0..1 + (h % 3) {
                    h = splitmix64(h);
                    word.extend_from_slice(ONSETS[(h % 16) as usize].as_bytes());
                    word.extend_from_slice(VOWELS[((h >> 8) % 8) as usize].as_bytes());
                    word.extend_from_slice(CODAS[((h >> 16) % 8) as usize].as_bytes());
                }
            }
            assert!(word.len() < WORD_SLOT, "a word fits its slot with its length");
            slot[..word.len()].copy_from_slice(&word);
            slot[WORD_SLOT - 1] = word.len() as u8;
        }
        Self { slots }
    }

    /// One vocabulary for the process (built on first use).
    pub fn shared() -> &'static Vocab {
        Self::shared_arc()
    }

    /// The process's vocabulary as an `Arc` for backends that hold it:
    /// built once, however many backends (or simulated servers: the
    /// session fuzzer builds one per input) are made.
    pub fn shared_arc() -> &'static std::sync::Arc<Vocab> {
        static VOCAB: OnceLock<std::sync::Arc<Vocab>> = OnceLock::new();
        VOCAB.get_or_init(|| std::sync::Arc::new(Vocab::new()))
    }

    pub fn word(&self, id: u32) -> &[u8] {
        // A mask, not `%`: a division per token was half of the synthetic
        // backend's poll at 4,096 streams.
        const _: () = assert!(Vocab::SIZE.is_power_of_two());
        let slot = &self.slots[id as usize & (Self::SIZE - 1)];
        &slot[..usize::from(slot[WORD_SLOT - 1])]
    }
}

/// The text of a run of tokens and each one's length, built a word at a
/// time: the form in which a backend hands a stream's tokens to
/// [`crate::Sink::tokens`] in one call. Its buffers grow to the longest
/// run and are kept.
#[derive(Debug, Default)]
pub struct WordRun {
    /// The text in `text[..len]`; at least `WORD_SLOT` bytes beyond it,
    /// which the next word's copy overwrites.
    text: Vec<u8>,
    len: usize,
    lens: Vec<u32>,
}

impl WordRun {
    pub fn clear(&mut self) {
        self.len = 0;
        self.lens.clear();
    }

    /// Appends the words `ids` (taken modulo the vocabulary, as
    /// [`Vocab::word`]).
    pub fn extend(&mut self, vocab: &Vocab, ids: &[u32]) {
        let need = self.len + (ids.len() + 1) * WORD_SLOT;
        if self.text.len() < need {
            self.text.resize(need.next_power_of_two(), 0);
        }
        // A mask into a table of exactly SIZE slots: no bounds check.
        let slot = |id: u32| &vocab.slots[id as usize & (Vocab::SIZE - 1)];
        self.lens
            .extend(ids.iter().map(|&id| u32::from(slot(id)[WORD_SLOT - 1])));
        let base = self.text[self.len..need].as_mut_ptr();
        let mut at = 0;
        for &id in ids {
            let slot = slot(id);
            // SAFETY: `text[len..need]` holds `(ids.len() + 1) * WORD_SLOT`
            // bytes and each word is shorter than a slot, so word k starts
            // below `k * WORD_SLOT` and its whole slot ends within it; the
            // source is a distinct allocation (the vocabulary's).
            unsafe { std::ptr::copy_nonoverlapping(slot.as_ptr(), base.add(at), WORD_SLOT) };
            // The whole slot: a move of constant size; what lies beyond the
            // word is overwritten by the next.
            at += usize::from(slot[WORD_SLOT - 1]);
        }
        self.len += at;
    }

    pub fn text(&self) -> &[u8] {
        &self.text[..self.len]
    }

    /// Each token's length in bytes, in order.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }
}

impl Default for Vocab {
    fn default() -> Self {
        Self::new()
    }
}

pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of the prompt (the same text gives the same tokens
/// across runs and machines): the length, then eight bytes at a time
/// (little-endian, the last word zero-padded), each word mixed in by a
/// multiply and a shift, then splitmix64's finalizer. Until session 27 it
/// was FNV-1a, a byte at a time: a chain of one multiply per byte, about a
/// tenth of a zero-delay request's server time in cnse-dp and the
/// benchmark peers alike (device profile), where this is a chain of one
/// per word.
pub fn prompt_hash(prompt: &str) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |h: u64, word: u64| {
        let h = (h ^ word).wrapping_mul(K);
        h ^ (h >> 29)
    };
    let bytes = prompt.as_bytes();
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h = mix(h, u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut last = [0u8; 8];
        last[..rest.len()].copy_from_slice(rest);
        h = mix(h, u64::from_le_bytes(last));
    }
    splitmix64(h)
}

/// The text the synthetic backend produces for (prompt, seed) with the
/// default picker: what a client must receive, token by token.
pub fn expected_text(prompt: &str, seed: u64, max_tokens: u32) -> Vec<u8> {
    let vocab = Vocab::shared();
    let mut out = Vec::new();
    for position in 0..u64::from(max_tokens) {
        out.extend_from_slice(vocab.word(hash_pick(prompt_hash(prompt) ^ seed, position)));
    }
    out
}

/// Tokens of `text` read the way this model writes them, so that usage can
/// count a prompt as the model would: every word of the vocabulary is a
/// whitespace character and the run of other characters behind it (or such
/// a run at the start of the text), `,` and `.` stand alone. Its own output
/// counts as the tokens it was made of; a whitespace character followed by
/// another counts alone.
pub fn token_count(text: &str) -> u64 {
    let mut n = 0u64;
    // Inside a token that later characters extend.
    let mut open = false;
    for ch in text.chars() {
        if ch == ',' || ch == '.' {
            n += 1;
            open = false;
        } else if ch.is_whitespace() || !open {
            // A new token: whitespace always starts one, a character does
            // where none is open.
            n += 1;
            open = true;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_reads_its_own_text_as_the_tokens_it_wrote() {
        for seed in 0..300 {
            for n in [1, 7, 64] {
                let text = expected_text("hello", seed, n);
                let text = std::str::from_utf8(&text).unwrap();
                assert_eq!(token_count(text), u64::from(n), "{text:?}");
            }
        }
    }

    #[test]
    fn a_word_run_is_the_words_one_after_another() {
        let vocab = Vocab::shared();
        let mut run = WordRun::default();
        for round in 0..3u32 {
            run.clear();
            let mut text = Vec::new();
            // Every word, and ids past the vocabulary (taken modulo it).
            // In calls of every size up to 40 words.
            let ids: Vec<u32> = (0..Vocab::SIZE as u32 + 40)
                .map(|i| i.wrapping_mul(7).wrapping_add(round))
                .collect();
            let mut rest = &ids[..];
            let mut k = 0;
            while !rest.is_empty() {
                let (now, later) = rest.split_at((k % 41).min(rest.len()));
                run.extend(vocab, now);
                rest = later;
                k += 1;
            }
            for &id in &ids {
                text.extend_from_slice(vocab.word(id));
            }
            assert_eq!(run.text(), &text[..]);
            assert_eq!(run.lens().len(), Vocab::SIZE + 40);
            let mut at = 0;
            for (i, &n) in run.lens().iter().enumerate() {
                let id = (i as u32).wrapping_mul(7).wrapping_add(round);
                assert_eq!(&run.text()[at..at + n as usize], vocab.word(id));
                at += n as usize;
            }
        }
    }

    #[test]
    fn prompt_hashes_are_stable_and_tell_prompts_apart() {
        // Pinned: the same prompt gives the same text on every machine and
        // run, so a change here is a change of the synthetic model's text.
        assert_eq!(prompt_hash("Write a haiku about the sea."), 0x764f_1f1b_b8f3_143d);
        // Every prompt of up to 24 bytes over a few letters (lengths across
        // the word boundaries), trailing NULs (the padding), and one byte
        // changed at each position of a long prompt: no two alike.
        let mut seen = std::collections::HashSet::new();
        let mut prompts = vec![String::new()];
        for len in 1..=24 {
            for (i, c) in ["a", "b", "\0", "é"].iter().enumerate() {
                prompts.push(format!("{}{}", "x".repeat(len - 1), c));
                prompts.push(format!("{}{}", c.repeat(len), i));
            }
        }
        let long = "The quick brown fox jumps over the lazy dog. ".repeat(3);
        for at in 0..long.len() {
            let mut b = long.clone().into_bytes();
            b[at] ^= 0x01;
            prompts.push(String::from_utf8(b).unwrap());
        }
        prompts.push(long);
        for p in &prompts {
            assert!(seen.insert(prompt_hash(p)), "collision at {p:?}");
        }
        assert_eq!(seen.len(), prompts.len());
    }

    #[test]
    fn prompts_are_counted_by_words_spaces_and_stops() {
        assert_eq!(token_count(""), 0);
        assert_eq!(token_count("Write a haiku about the sea."), 7);
        assert_eq!(token_count("a,b"), 3);
        assert_eq!(token_count("two  spaces"), 3);
        assert_eq!(token_count("<|user|>\nHi\n<|assistant|>\n"), 4);
    }
}
