//! Deterministic, incompressible test bytes, shared by the store and GPU
//! suites (through `store_support` and `gpu_common`).

/// `len` bytes of xorshift noise, eight at a time: the same (len, seed)
/// always gives the same bytes, different seeds different ones.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ len as u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}
