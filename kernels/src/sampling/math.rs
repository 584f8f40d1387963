//! The arithmetic that the CPU reference and `cuda/sampling.cu` must agree on
//! bit for bit. Every function here has a twin of the same name in the CUDA
//! source, written with the same operations in the same order; NVRTC compiles
//! it with `--fmad=false`, so no multiply-add is contracted into an FMA and
//! each `+ - * /` rounds exactly as Rust's does (IEEE-754, round to nearest).
//!
//! Why not `f32::exp`: the libm and CUDA `expf` differ in the last ulp, and a
//! one-ulp difference can move a top-p cut or a sampled token. `exp_det` uses
//! only correctly rounded operations, so both sides compute the same bits.
//! Sums of probabilities are taken over fixed-point integers (`weight_q`), so
//! their order (sequential here, tree-shaped on the GPU) cannot matter.

/// Weyl constant of splitmix64.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Separates the sampling draw from the logit stream of the same row.
pub const DRAW_SALT: u64 = 0xD1B5_4A32_D192_ED03;
/// Fixed-point scale of a token weight: weight 1.0 (the row maximum) is 2^40.
/// 256k tokens × 2^40 < 2^58, so a row's total never overflows a u64.
pub const WEIGHT_SCALE: f32 = 1_099_511_627_776.0;
/// Largest vocabulary the kernels accept (indices and sums are sized for it).
pub const VOCAB_MAX: u32 = 1 << 18;

const _: () = assert!((VOCAB_MAX as u64) << 40 < u64::MAX >> 4);

/// splitmix64 finaliser: a bijective 64-bit mixer.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The counter of one logit row: a hash of (seed, position).
#[inline]
pub fn row_key(seed: u64, position: u64) -> u64 {
    mix64(seed ^ mix64(position ^ GOLDEN))
}

/// The uniform 64-bit draw that picks the token of a row.
#[inline]
pub fn row_draw(row_key: u64) -> u64 {
    mix64(row_key ^ DRAW_SALT)
}

const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
const TWO_POW_M16: f32 = 1.0 / 65_536.0;

/// Synthetic logit of token `index` in the row `row_key`: uniform in
/// [-3, 3), and about one token in 1024 boosted by 6..10 so that rows have
/// the few dominant tokens of a real model's output. Only exact conversions
/// and single rounded operations, so CUDA computes the same bits.
#[inline]
pub fn synth_logit(row_key: u64, index: u32) -> f32 {
    let h = mix64(row_key.wrapping_add((index as u64 + 1).wrapping_mul(GOLDEN)));
    let u = ((h >> 40) as f32) * TWO_POW_M24;
    let mut logit = u * 6.0 - 3.0;
    if (h >> 16) & 0x3FF == 0 {
        let v = ((h & 0xFFFF) as f32) * TWO_POW_M16;
        logit += v * 4.0 + 6.0;
    }
    logit
}

/// Order-preserving map of a logit to u32: a larger logit gives a larger key.
/// NaN and ±inf map to 0, below every finite logit, and get weight 0.
#[inline]
pub fn key_of(logit: f32) -> u32 {
    if !logit.is_finite() {
        return 0;
    }
    let b = logit.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Key and index in one u64: larger key first, then lower index first, so
/// every token of a row has a distinct rank and ties break the same way on
/// CPU and GPU.
#[inline]
pub fn rank_of(key: u32, index: u32) -> u64 {
    ((key as u64) << 32) | (u32::MAX - index) as u64
}

/// The index inside a rank.
#[inline]
pub fn index_of_rank(rank: u64) -> u32 {
    u32::MAX - rank as u32
}

const LOG2E: u32 = 0x3FB8_AA3B;
const LN2_HI: u32 = 0x3F31_7200;
const LN2_LO: u32 = 0x35BF_BE8E;
// Taylor coefficients 1/n!, as bit patterns so that the CUDA twin uses the
// very same f32 values (checked in the tests below).
const C2: f32 = 0.5;
const C3: u32 = 0x3E2A_AAAB;
const C4: u32 = 0x3D2A_AAAB;
const C5: u32 = 0x3C08_8889;
const C6: u32 = 0x3AB6_0B61;

/// e^x for x <= 0 with about 2e-7 relative error, from correctly rounded
/// operations only (Cody–Waite reduction, degree-6 Taylor polynomial).
/// Returns 0 below -87 (where f32 would go subnormal) and for NaN.
#[inline]
pub fn exp_det(x: f32) -> f32 {
    if x.is_nan() || x <= -87.0 {
        return 0.0;
    }
    exp_core(if x > 0.0 { 0.0 } else { x })
}

/// The body of `exp_det` for x in (-87, 0]: no branch, so that the lane
/// loops of `fast.rs` vectorise it and compute the very same bits.
#[inline(always)]
pub(crate) fn exp_core(x: f32) -> f32 {
    let n = (x * f32::from_bits(LOG2E) + 0.5).floor();
    let r = (x - n * f32::from_bits(LN2_HI)) - n * f32::from_bits(LN2_LO);
    let (c3, c4, c5, c6) = (
        f32::from_bits(C3),
        f32::from_bits(C4),
        f32::from_bits(C5),
        f32::from_bits(C6),
    );
    let p = 1.0 + r * (1.0 + r * (C2 + r * (c3 + r * (c4 + r * (c5 + r * c6)))));
    p * pow2(n)
}

/// 2^n for an integer-valued n in [-126, 127]: the bits of `n as i32`, read
/// from the mantissa of n + 1.5 × 2^23 (exact for |n| < 2^22), because SIMD
/// lanes have that add and lack Rust's saturating float → int conversion.
#[inline(always)]
fn pow2(n: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    let n_i32 = (n + MAGIC).to_bits().wrapping_sub(MAGIC.to_bits());
    f32::from_bits(n_i32.wrapping_add(127) << 23)
}

/// Fixed-point weight of a logit: round_down(e^((logit - max) / T) × 2^40).
/// `inv_temp` is 1/T computed once on the host; both sides multiply by it.
#[inline]
pub fn weight_q(logit: f32, max_logit: f32, inv_temp: f32) -> u64 {
    if !logit.is_finite() {
        return 0;
    }
    let w = exp_det((logit - max_logit) * inv_temp);
    (w * WEIGHT_SCALE) as u64
}

/// The top-p mass a row must reach: ceil(p × total), clamped to [1, total].
#[inline]
pub fn top_p_target(top_p: f32, total: u64) -> u64 {
    let t = (top_p as f64 * total as f64).ceil();
    let t = if t < 1.0 { 1 } else { t as u64 };
    t.min(total)
}

/// Uniform integer in [0, total): the high half of draw × total.
#[inline]
pub fn scale_draw(draw: u64, total: u64) -> u64 {
    ((draw as u128 * total as u128) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_det_tracks_libm_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -86.9f32;
        while x <= 0.0 {
            let got = exp_det(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.00137;
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp_det(0.0), 1.0);
        assert_eq!(exp_det(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_det(f32::NAN), 0.0);
        assert_eq!(exp_det(-100.0), 0.0);
    }

    #[test]
    fn polynomial_constants_are_the_reciprocal_factorials() {
        assert_eq!(f32::from_bits(C3), 1.0 / 6.0);
        assert_eq!(f32::from_bits(C4), 1.0 / 24.0);
        assert_eq!(f32::from_bits(C5), 1.0 / 120.0);
        assert_eq!(f32::from_bits(C6), 1.0 / 720.0);
        assert_eq!(WEIGHT_SCALE.to_bits(), 0x5380_0000);
    }

    #[test]
    fn pow2_is_the_exponent_of_n_as_i32() {
        for n in -126..=127 {
            let f = n as f32;
            assert_eq!(pow2(f).to_bits(), (((f as i32 + 127) as u32) << 23), "{n}");
        }
    }

    #[test]
    fn key_order_matches_float_order() {
        let vals = [-f32::MAX, -1e9, -1.5, -1e-30, -0.0, 0.0, 1e-30, 0.25, 3.0, f32::MAX];
        for w in vals.windows(2) {
            assert!(key_of(w[0]) <= key_of(w[1]), "{} vs {}", w[0], w[1]);
        }
        assert_eq!(key_of(f32::NAN), 0);
        assert_eq!(key_of(f32::INFINITY), 0);
        assert!(key_of(-f32::MAX) > 0);
    }

    #[test]
    fn rank_breaks_ties_by_lower_index() {
        assert!(rank_of(7, 3) > rank_of(7, 4));
        assert!(rank_of(8, 100) > rank_of(7, 0));
        assert_eq!(index_of_rank(rank_of(5, 12345)), 12345);
    }

    #[test]
    fn weights_are_one_at_the_max_and_monotone() {
        assert_eq!(weight_q(2.0, 2.0, 1.0), 1u64 << 40);
        assert!(weight_q(1.0, 2.0, 1.0) < weight_q(1.5, 2.0, 1.0));
        assert_eq!(weight_q(f32::NAN, 2.0, 1.0), 0);
    }

    #[test]
    fn synthetic_logits_are_deterministic_and_spread() {
        let k = row_key(42, 7);
        assert_eq!(synth_logit(k, 5), synth_logit(row_key(42, 7), 5));
        assert_ne!(row_key(42, 7), row_key(42, 8));
        let boosted = (0..1 << 17).filter(|&i| synth_logit(k, i) >= 3.0).count();
        assert!((64..256).contains(&boosted), "{boosted} boosted tokens");
    }

    #[test]
    fn top_p_target_is_clamped() {
        assert_eq!(top_p_target(0.0, 100), 1);
        assert_eq!(top_p_target(1.0, 100), 100);
        assert_eq!(top_p_target(0.5, 101), 51);
        assert_eq!(scale_draw(u64::MAX, 10), 9);
        assert_eq!(scale_draw(0, 10), 0);
    }
}
