//! Reads the facts a user asks about a GGUF model from its header: the
//! architecture, the quantization, the tensor count, the context length and
//! the parameter count. Only what the file states (or what its tensor shapes
//! add up to) is reported; nothing is guessed.
//!
//! The parser is bounded by the bytes it is given: every length is checked
//! against what remains before it is used, so a hostile header cannot make it
//! allocate or loop beyond the file.

/// Magic at the start of every GGUF file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Most dimensions a GGML tensor has.
const TENSOR_DIMS_MAX: u32 = 4;
/// Longest key or string value we accept (GGUF keys are short; vocabularies
/// hold many short strings, never one huge one).
const STRING_BYTES_MAX: u64 = 1 << 24;
/// Deepest nesting of arrays of arrays.
const ARRAY_DEPTH_MAX: u32 = 4;

/// What the GGUF header says about a model (archived as is in manifests).
#[derive(Debug, Clone, PartialEq, Eq, Default, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct GgufInfo {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata_count: u64,
    /// `general.architecture`.
    pub architecture: Option<String>,
    /// `general.name`.
    pub model_name: Option<String>,
    /// `general.size_label`, e.g. "135M".
    pub size_label: Option<String>,
    /// `general.file_type` as llama.cpp names it (e.g. "Q4_1"), or the most
    /// common tensor type when the key is absent.
    pub quantization: Option<String>,
    /// `<architecture>.context_length`.
    pub context_length: Option<u64>,
    /// Sum of the element counts of all tensors.
    pub parameter_count: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufError(pub String);

impl std::fmt::Display for GgufError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `bytes` start like a GGUF file.
pub fn is_gguf(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == GGUF_MAGIC
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], GgufError> {
        let remaining = (self.bytes.len() - self.pos) as u64;
        if n > remaining {
            return Err(GgufError(format!(
                "header truncated at byte {} (needs {n} more)",
                self.pos
            )));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<&'a str, GgufError> {
        let len = self.u64()?;
        if len > STRING_BYTES_MAX {
            return Err(GgufError(format!("string of {len} bytes at byte {}", self.pos)));
        }
        let at = self.pos;
        std::str::from_utf8(self.take(len)?).map_err(|_| GgufError(format!("string at byte {at} is not UTF-8")))
    }
}

/// A scalar metadata value we keep; everything else is skipped.
enum Value<'a> {
    Uint(u64),
    Str(&'a str),
    Other,
}

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

fn scalar_bytes(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

fn read_value<'a>(c: &mut Cursor<'a>, ty: u32, depth: u32) -> Result<Value<'a>, GgufError> {
    match ty {
        TYPE_STRING => Ok(Value::Str(c.string()?)),
        TYPE_ARRAY => {
            if depth >= ARRAY_DEPTH_MAX {
                return Err(GgufError("arrays nested too deep".into()));
            }
            let elem = c.u32()?;
            let count = c.u64()?;
            if let Some(n) = scalar_bytes(elem) {
                let total = count
                    .checked_mul(n)
                    .ok_or_else(|| GgufError("array size overflows".into()))?;
                c.take(total)?;
            } else {
                // Each element needs at least 8 bytes (a length), so a count
                // larger than the rest of the file is a lie: stop early.
                if count > (c.bytes.len() - c.pos) as u64 / 8 + 1 {
                    return Err(GgufError(format!("array of {count} elements cannot fit the file")));
                }
                for _ in 0..count {
                    read_value(c, elem, depth + 1)?;
                }
            }
            Ok(Value::Other)
        }
        _ => {
            let n = scalar_bytes(ty).ok_or_else(|| GgufError(format!("unknown value type {ty}")))?;
            let b = c.take(n)?;
            Ok(match ty {
                0 => Value::Uint(b[0] as u64),
                2 => Value::Uint(u16::from_le_bytes([b[0], b[1]]) as u64),
                4 => Value::Uint(u32::from_le_bytes(b.try_into().expect("4 bytes")) as u64),
                10 => Value::Uint(u64::from_le_bytes(b.try_into().expect("8 bytes"))),
                5 => match i32::from_le_bytes(b.try_into().expect("4 bytes")) {
                    v if v >= 0 => Value::Uint(v as u64),
                    _ => Value::Other,
                },
                11 => match i64::from_le_bytes(b.try_into().expect("8 bytes")) {
                    v if v >= 0 => Value::Uint(v as u64),
                    _ => Value::Other,
                },
                _ => Value::Other,
            })
        }
    }
}

/// Parses the GGUF header (version 2 or 3) at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Result<GgufInfo, GgufError> {
    if !is_gguf(bytes) {
        return Err(GgufError("no GGUF magic".into()));
    }
    let mut c = Cursor { bytes, pos: 4 };
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(GgufError(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        )));
    }
    let tensor_count = c.u64()?;
    let metadata_count = c.u64()?;
    let mut info = GgufInfo {
        version,
        tensor_count,
        metadata_count,
        ..GgufInfo::default()
    };
    let mut file_type = None;
    // Context length keys are per architecture; the architecture key may come
    // after them, so remember them all and pick once the loop is over.
    let mut context_lengths: Vec<(String, u64)> = Vec::new();
    for _ in 0..metadata_count {
        let key = c.string()?;
        let ty = c.u32()?;
        match (key, read_value(&mut c, ty, 0)?) {
            ("general.architecture", Value::Str(s)) => info.architecture = Some(s.to_string()),
            ("general.name", Value::Str(s)) => info.model_name = Some(s.to_string()),
            ("general.size_label", Value::Str(s)) => info.size_label = Some(s.to_string()),
            ("general.file_type", Value::Uint(v)) => file_type = Some(v),
            (k, Value::Uint(v)) if k.ends_with(".context_length") && context_lengths.len() < 16 => {
                context_lengths.push((k.to_string(), v))
            }
            _ => {}
        }
    }
    if let Some(arch) = &info.architecture {
        let want = format!("{arch}.context_length");
        info.context_length = context_lengths.iter().find(|(k, _)| *k == want).map(|(_, v)| *v);
    }
    info.quantization = file_type.and_then(|t| file_type_name(t).map(str::to_string));

    // Tensor infos: name, dims, type, offset. Counted only if all are sane.
    let mut params: u64 = 0;
    let mut type_counts = [0u64; 64];
    let mut tensors_ok = true;
    for _ in 0..tensor_count {
        c.string()?;
        let n_dims = c.u32()?;
        if n_dims == 0 || n_dims > TENSOR_DIMS_MAX {
            return Err(GgufError(format!("tensor with {n_dims} dimensions")));
        }
        let mut elems: u64 = 1;
        for _ in 0..n_dims {
            let d = c.u64()?;
            match elems.checked_mul(d) {
                Some(e) => elems = e,
                None => tensors_ok = false,
            }
        }
        let ty = c.u32()?;
        c.u64()?;
        match params.checked_add(elems) {
            Some(p) => params = p,
            None => tensors_ok = false,
        }
        if (ty as usize) < type_counts.len() {
            // Saturating: the shapes are the file's word, and a hostile one
            // must not overflow (the count only ranks the types).
            type_counts[ty as usize] = type_counts[ty as usize].saturating_add(elems);
        }
    }
    if tensors_ok && tensor_count > 0 {
        info.parameter_count = Some(params);
    }
    if info.quantization.is_none() && tensor_count > 0 {
        let (ty, _) = type_counts
            .iter()
            .enumerate()
            .max_by_key(|(_, n)| **n)
            .expect("non-empty");
        info.quantization = tensor_type_name(ty as u32).map(str::to_string);
    }
    Ok(info)
}

/// llama.cpp's `llama_ftype` names (the value of `general.file_type`).
pub fn file_type_name(t: u64) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        _ => return None,
    })
}

/// GGML tensor type names.
pub fn tensor_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }

    /// A small but complete GGUF v3 header.
    pub(crate) fn sample() -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(5u64.to_le_bytes()); // kvs
        s(&mut b, "llama.context_length");
        b.extend(4u32.to_le_bytes());
        b.extend(8192u32.to_le_bytes());
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "general.file_type");
        b.extend(4u32.to_le_bytes());
        b.extend(3u32.to_le_bytes());
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "<s>");
        s(&mut b, "</s>");
        s(&mut b, "tokenizer.ggml.scores");
        b.extend(9u32.to_le_bytes());
        b.extend(6u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend([0u8; 8]);
        for (name, dims, ty) in [("tok_embd", &[64u64, 10][..], 3u32), ("norm", &[64][..], 0)] {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn parses_the_facts_it_states() {
        let info = parse(&sample()).unwrap();
        assert_eq!(info.version, 3);
        assert_eq!(info.architecture.as_deref(), Some("llama"));
        assert_eq!(info.quantization.as_deref(), Some("Q4_1"));
        assert_eq!(info.context_length, Some(8192));
        assert_eq!(info.tensor_count, 2);
        assert_eq!(info.parameter_count, Some(704));
        assert_eq!(info.model_name, None, "absent keys stay absent");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let b = sample();
        for n in 0..b.len() {
            assert!(parse(&b[..n]).is_err(), "truncated at {n} parsed");
        }
    }

    /// Issue 11, found while writing the `gguf` fuzz target: two tensors of
    /// 2^63 elements each overflowed the per-type count (a panic with
    /// overflow checks, a wrong count without).
    #[test]
    fn issue11_huge_tensor_shapes_are_not_an_overflow() {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(0u64.to_le_bytes()); // kvs
        for name in ["a", "b"] {
            s(&mut b, name);
            b.extend(1u32.to_le_bytes());
            b.extend((1u64 << 63).to_le_bytes());
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        let info = parse(&b).unwrap();
        assert_eq!(info.parameter_count, None, "an overflowing sum is not stated");
        assert_eq!(info.quantization.as_deref(), Some("F32"));
    }

    #[test]
    fn corrupted_headers_never_panic() {
        let b = sample();
        for i in 4..b.len() {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut c = b.clone();
                c[i] ^= bit;
                let _ = parse(&c);
            }
        }
    }
}
