//! The CPU reference (`cpu.rs`) rewritten for speed, with the same token ids.
//!
//! Every decision of the reference is an integer one: the argmax and the
//! top-k/top-p cuts compare ranks (`math::rank_of`), and every sum is a sum
//! of fixed-point weights (`math::weight_q`), so the order in which a loop
//! visits tokens cannot change an id. The only floating point is per token
//! (the synthetic logit, the weight), and it is written here with the same
//! operations as the reference, branch-free, so that LLVM turns each pass
//! into SIMD lanes and each lane computes the reference's bits. Rust never
//! contracts `a * b + c` into an FMA, with or without the `fma` feature.
//!
//! What is faster than the reference, besides the lanes:
//! - top-k and top-p find the bin of the cut in a histogram of the keys' top
//!   12 bits (counts, or weight sums), then order only that bin's tokens,
//!   where the reference orders the whole row (a sort of 128k ranks for a
//!   top-p without top-k);
//! - the draw sums blocks of 256 weights and walks only the block it lands in.
//!
//! The passes are compiled three times, for baseline x86-64 (SSE2), AVX2 and
//! AVX-512, and the widest level the CPU has is picked at run time
//! (`Simd::detect`); the binary itself stays baseline x86-64.

use super::math::{exp_core, index_of_rank, rank_of, scale_draw, top_p_target, GOLDEN, WEIGHT_SCALE};
use super::RowParams;

/// Histogram bins over a key's top 12 bits (16 KiB of counts, 32 KiB of sums).
const BIN_SHIFT: u32 = 20;
const BINS: usize = 1 << (32 - BIN_SHIFT);
/// Weights the draw sums before it looks inside a block.
const DRAW_BLOCK: usize = 256;

/// The instruction set the lane loops are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    /// Baseline x86-64 (SSE2) or whatever the target has.
    Baseline,
    Avx2,
    Avx512,
}

impl Simd {
    /// The widest level this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512bw")
            {
                return Simd::Avx512;
            }
            if is_x86_feature_detected!("avx2") {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }

    /// Every level this CPU runs, narrowest first.
    pub fn available() -> Vec<Simd> {
        let best = Self::detect();
        [Simd::Baseline, Simd::Avx2, Simd::Avx512]
            .into_iter()
            .filter(|&s| s.width() <= best.width())
            .collect()
    }

    fn width(self) -> u32 {
        match self {
            Simd::Baseline => 128,
            Simd::Avx2 => 256,
            Simd::Avx512 => 512,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Simd::Baseline => "baseline",
            Simd::Avx2 => "avx2",
            Simd::Avx512 => "avx512",
        }
    }
}

/// One row's scratch: logits, weights, candidates and histograms, sized once
/// for the vocabulary, so sampling allocates nothing after construction.
pub struct FastRow {
    simd: Simd,
    logits: Vec<f32>,
    bufs: Bufs,
}

struct Bufs {
    weights: Vec<u64>,
    cand: Vec<u64>,
    count_hist: Vec<u32>,
    weight_hist: Vec<u64>,
}

impl FastRow {
    /// Scratch for rows of `vocab` tokens at the widest level this CPU runs.
    pub fn new(vocab: usize) -> Self {
        Self::with_simd(vocab, Simd::detect()).expect("the detected level runs")
    }

    /// Scratch at a given level; `None` when this CPU lacks it.
    pub fn with_simd(vocab: usize, simd: Simd) -> Option<Self> {
        if simd.width() > Simd::detect().width() {
            return None;
        }
        Some(Self {
            simd,
            logits: vec![0.0; vocab],
            bufs: Bufs {
                weights: vec![0; vocab],
                cand: Vec::with_capacity(vocab),
                count_hist: vec![0; BINS],
                weight_hist: vec![0; BINS],
            },
        })
    }

    pub fn simd(&self) -> Simd {
        self.simd
    }

    /// Generates the row's logits from `p.row_key` (as `math::synth_logit`)
    /// and samples it: the id `CpuSampler` gives.
    pub fn sample_synth(&mut self, p: &RowParams) -> u32 {
        fill(self.simd, p.row_key, &mut self.logits);
        run(self.simd, &self.logits, &mut self.bufs, p)
    }

    /// Samples caller-supplied logits: the id `RowScratch::sample_row` gives.
    /// `logits` must have the vocabulary's length.
    pub fn sample_logits(&mut self, logits: &[f32], p: &RowParams) -> u32 {
        assert_eq!(logits.len(), self.logits.len(), "a row of the vocabulary's length");
        run(self.simd, logits, &mut self.bufs, p)
    }
}

fn fill(simd: Simd, key: u64, out: &mut [f32]) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `FastRow` holds a level only after `Simd::detect` found
        // it on this CPU (`with_simd`).
        Simd::Avx512 => unsafe { fill_avx512(key, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, AVX2 was detected.
        Simd::Avx2 => unsafe { fill_avx2(key, out) },
        _ => synth_fill(key, out),
    }
}

fn run(simd: Simd, logits: &[f32], bufs: &mut Bufs, p: &RowParams) -> u32 {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a `FastRow` holds a level only after `Simd::detect` found
        // it on this CPU (`with_simd`).
        Simd::Avx512 => unsafe { row_avx512(logits, bufs, p) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above, AVX2 was detected.
        Simd::Avx2 => unsafe { row_avx2(logits, bufs, p) },
        _ => sample_row(logits, bufs, p),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2")]
fn fill_avx512(key: u64, out: &mut [f32]) {
    synth_fill(key, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn fill_avx2(key: u64, out: &mut [f32]) {
    synth_fill(key, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2")]
fn row_avx512(logits: &[f32], bufs: &mut Bufs, p: &RowParams) -> u32 {
    sample_row(logits, bufs, p)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_avx2(logits: &[f32], bufs: &mut Bufs, p: &RowParams) -> u32 {
    sample_row(logits, bufs, p)
}

// ---- lanes: each the reference's per-token arithmetic, branch-free ----------

const TWO_POW_M24: f32 = 1.0 / 16_777_216.0;
const TWO_POW_M16: f32 = 1.0 / 65_536.0;

/// `math::synth_logit`: the integer-to-float conversions go through i32
/// (exact, the values are below 2^24), which SIMD has and u64 → f32 lacks.
#[inline(always)]
fn synth_lane(row_key: u64, index: u32) -> f32 {
    let h = super::math::mix64(row_key.wrapping_add((index as u64 + 1).wrapping_mul(GOLDEN)));
    let u = ((h >> 40) as i32 as f32) * TWO_POW_M24;
    let logit = u * 6.0 - 3.0;
    let v = ((h & 0xFFFF) as i32 as f32) * TWO_POW_M16;
    let boosted = logit + (v * 4.0 + 6.0);
    if (h >> 16) & 0x3FF == 0 {
        boosted
    } else {
        logit
    }
}

#[inline(always)]
fn synth_fill(key: u64, out: &mut [f32]) {
    for (i, l) in out.iter_mut().enumerate() {
        *l = synth_lane(key, i as u32);
    }
}

/// `math::key_of` without branches.
#[inline(always)]
fn key_lane(logit: f32) -> u32 {
    let b = logit.to_bits();
    let k = if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 };
    if b & 0x7FFF_FFFF < 0x7F80_0000 {
        k
    } else {
        0
    }
}

/// `math::weight_q`: masked lanes compute e^0 and are then zeroed.
#[inline(always)]
fn weight_lane(logit: f32, max_logit: f32, inv_temp: f32) -> u64 {
    let x = (logit - max_logit) * inv_temp;
    let keep = logit.is_finite() && !(x.is_nan() || x <= -87.0);
    let x = if x > 0.0 || !keep { 0.0 } else { x };
    let q = f32_to_u64(exp_core(x) * WEIGHT_SCALE);
    if keep {
        q
    } else {
        0
    }
}

/// `y as u64` for 0 <= y < 2^52 through f64: floor, then the integer is the
/// mantissa of y + 2^52. SIMD has every step; AVX2 has no f32 → u64.
#[inline(always)]
fn f32_to_u64(y: f32) -> u64 {
    const TWO_POW_52: f64 = 4_503_599_627_370_496.0;
    ((y as f64).floor() + TWO_POW_52).to_bits() - TWO_POW_52.to_bits()
}

// ---- the row: the reference's pipeline (cpu.rs, module comment) ------------

#[inline(always)]
fn sample_row(logits: &[f32], b: &mut Bufs, p: &RowParams) -> u32 {
    let (arg, max_key) = argmax(logits);
    let max_logit = logits[arg as usize];
    if p.inv_temp == 0.0 || max_key == 0 {
        return arg;
    }
    let mut total = fill_weights(logits, &mut b.weights, max_logit, p.inv_temp);
    let floor = top_k_threshold(logits, b, p.top_k);
    let floor = top_p_threshold(logits, b, floor, p.top_p, total);
    if floor != 0 {
        total = mask_below(logits, &mut b.weights, floor);
    }
    draw(&b.weights, scale_draw(p.draw, total))
}

/// Lanes per step of the explicit lane loops: 16 f32 (one AVX-512 register,
/// two AVX2 registers), each lane with its own accumulator.
const LANES: usize = 16;

/// Weights of the row into `weights`; their sum.
#[inline(always)]
fn fill_weights(logits: &[f32], weights: &mut [u64], max_logit: f32, inv_temp: f32) -> u64 {
    let mut acc = [0u64; LANES];
    let mut wc = weights.chunks_exact_mut(LANES);
    let mut lc = logits.chunks_exact(LANES);
    for (w, l) in (&mut wc).zip(&mut lc) {
        for j in 0..LANES {
            let q = weight_lane(l[j], max_logit, inv_temp);
            w[j] = q;
            acc[j] += q;
        }
    }
    let mut total: u64 = acc.iter().sum();
    for (w, &l) in wc.into_remainder().iter_mut().zip(lc.remainder()) {
        *w = weight_lane(l, max_logit, inv_temp);
        total += *w;
    }
    total
}

/// The largest key of the row.
#[inline(always)]
fn max_key(logits: &[f32]) -> u32 {
    let mut acc = [0u32; LANES];
    let mut lc = logits.chunks_exact(LANES);
    for l in &mut lc {
        for j in 0..LANES {
            acc[j] = acc[j].max(key_lane(l[j]));
        }
    }
    let m = acc.iter().fold(0, |m, &a| m.max(a));
    lc.remainder().iter().fold(m, |m, &l| m.max(key_lane(l)))
}

/// Best rank of the row: the largest key, then its lowest index. A key of 0
/// means no finite logit; the reference then answers index 0, as here.
#[inline(always)]
fn argmax(logits: &[f32]) -> (u32, u32) {
    let max_key = max_key(logits);
    for (c, chunk) in logits.chunks(DRAW_BLOCK).enumerate() {
        if chunk.iter().fold(false, |a, &l| a | (key_lane(l) == max_key)) {
            let j = chunk.iter().position(|&l| key_lane(l) == max_key).unwrap_or(0);
            return ((c * DRAW_BLOCK + j) as u32, max_key);
        }
    }
    unreachable!("the largest key is some token's key")
}

#[inline(always)]
fn bin_of(key: u32) -> usize {
    (key >> BIN_SHIFT) as usize
}

/// Rank threshold of top-k (0 keeps all): the k-th best rank, found in the
/// bin of the k-th best key.
#[inline(always)]
fn top_k_threshold(logits: &[f32], b: &mut Bufs, top_k: u32) -> u64 {
    let k = top_k as usize;
    if k == 0 || k >= logits.len() {
        return 0;
    }
    b.count_hist.fill(0);
    for &l in logits {
        b.count_hist[bin_of(key_lane(l))] += 1;
    }
    let mut above = 0usize;
    let mut bin = BINS - 1;
    while above + (b.count_hist[bin] as usize) < k {
        above += b.count_hist[bin] as usize;
        bin -= 1;
    }
    b.cand.clear();
    for (i, &l) in logits.iter().enumerate() {
        let key = key_lane(l);
        if bin_of(key) == bin {
            b.cand.push(rank_of(key, i as u32));
        }
    }
    let nth = k - above - 1;
    b.cand.select_nth_unstable_by(nth, |x, y| y.cmp(x));
    b.cand[nth]
}

/// Rank threshold of top-p over the tokens ranked at or above `floor`.
/// `total` is the weight of the whole row.
#[inline(always)]
fn top_p_threshold(logits: &[f32], b: &mut Bufs, floor: u64, top_p: f32, total: u64) -> u64 {
    if top_p >= 1.0 {
        return floor;
    }
    if floor != 0 {
        return top_p_in_top_k(logits, b, floor, top_p);
    }
    // The bin where the best-first running weight reaches the target, then
    // that bin's tokens in rank order.
    b.weight_hist.fill(0);
    for (&l, &w) in logits.iter().zip(&b.weights) {
        b.weight_hist[bin_of(key_lane(l))] += w;
    }
    let target = top_p_target(top_p, total);
    let mut cum = 0u64;
    let mut bin = BINS - 1;
    while cum + b.weight_hist[bin] < target {
        cum += b.weight_hist[bin];
        bin -= 1;
    }
    b.cand.clear();
    for (i, &l) in logits.iter().enumerate() {
        let key = key_lane(l);
        if bin_of(key) == bin {
            b.cand.push(rank_of(key, i as u32));
        }
    }
    cut(b, cum, target)
}

/// Top-p after a top-k cut: the few kept tokens, gathered and ordered.
#[inline(always)]
fn top_p_in_top_k(logits: &[f32], b: &mut Bufs, floor: u64, top_p: f32) -> u64 {
    let floor_key = (floor >> 32) as u32;
    b.cand.clear();
    let mut kept = 0u64;
    for (i, &l) in logits.iter().enumerate() {
        let key = key_lane(l);
        if key >= floor_key {
            let rank = rank_of(key, i as u32);
            if rank >= floor {
                b.cand.push(rank);
                kept += b.weights[i];
            }
        }
    }
    cut(b, 0, top_p_target(top_p, kept))
}

/// The first of `b.cand`, best first, where the running weight from `cum`
/// reaches `target`.
#[inline(always)]
fn cut(b: &mut Bufs, mut cum: u64, target: u64) -> u64 {
    b.cand.sort_unstable_by(|x, y| y.cmp(x));
    for &r in &b.cand {
        cum += b.weights[index_of_rank(r) as usize];
        if cum >= target {
            return r;
        }
    }
    unreachable!("target {target} <= the kept weight is always reached")
}

/// Zeroes the weight of every token ranked below `floor`; the kept total.
#[inline(always)]
fn mask_below(logits: &[f32], weights: &mut [u64], floor: u64) -> u64 {
    let mut total = 0u64;
    for (i, (w, &l)) in weights.iter_mut().zip(logits).enumerate() {
        let q = if rank_of(key_lane(l), i as u32) >= floor { *w } else { 0 };
        *w = q;
        total += q;
    }
    total
}

/// The token where the running weight first exceeds `r` (`r` < the total).
#[inline(always)]
fn draw(weights: &[u64], r: u64) -> u32 {
    let mut cum = 0u64;
    for (c, block) in weights.chunks(DRAW_BLOCK).enumerate() {
        let sum: u64 = block.iter().sum();
        if cum + sum > r {
            for (j, &w) in block.iter().enumerate() {
                cum += w;
                if cum > r {
                    return (c * DRAW_BLOCK + j) as u32;
                }
            }
        }
        cum += sum;
    }
    unreachable!("draw {r} below the total {cum} is always passed")
}

#[cfg(test)]
mod tests {
    use super::super::math::{key_of, synth_logit, weight_q};
    use super::*;

    #[test]
    fn lanes_compute_the_reference_bits() {
        for simd in Simd::available() {
            let mut row = FastRow::with_simd(4099, simd).unwrap();
            for seed in 0..20u64 {
                let key = super::super::math::row_key(seed, 7);
                fill(simd, key, &mut row.logits);
                for (i, &l) in row.logits.iter().enumerate() {
                    assert_eq!(l.to_bits(), synth_logit(key, i as u32).to_bits(), "{simd:?} {i}");
                }
            }
        }
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
            f32::MAX,
            -f32::MAX,
            1e-40,
        ];
        for &l in &specials {
            assert_eq!(key_lane(l), key_of(l));
            for &m in &[0.0f32, 3.0, f32::MAX] {
                assert_eq!(weight_lane(l, m, 1.25), weight_q(l, m, 1.25), "{l} {m}");
            }
        }
        let mut x = -200.0f32;
        while x <= 0.0 {
            for inv in [0.5f32, 1.0, 1.7, 1000.0] {
                assert_eq!(weight_lane(x, 0.0, inv), weight_q(x, 0.0, inv), "{x} {inv}");
            }
            x += 0.000_731;
        }
    }

    #[test]
    fn f32_to_u64_is_the_cast() {
        let mut bits = 0u32;
        while bits < 0x5400_0000 {
            let y = f32::from_bits(bits);
            assert_eq!(f32_to_u64(y), y as u64, "{y}");
            bits += 997;
        }
    }
}
