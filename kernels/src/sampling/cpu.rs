//! CPU reference of every sampling kernel. Each function defines the result;
//! `cuda/sampling.cu` computes the same with radix selection and block scans,
//! and the GPU tests compare the two exactly.
//!
//! Semantics of one row (`logits` of `vocab` entries):
//! 1. rank every token by (key of its logit, lower index first) — `math::rank_of`;
//! 2. weight = `weight_q(logit, max, 1/T)`; temperature 0 means argmax;
//! 3. top-k keeps the k best ranks (0 or >= vocab: all);
//! 4. top-p keeps the shortest best-first prefix of the top-k set whose weight
//!    reaches `top_p_target(p, weight of the set)` (p >= 1: all);
//! 5. the draw `scale_draw(row_draw, total)` picks the token where the running
//!    weight, in index order over the kept tokens, first exceeds it.

use super::math::{index_of_rank, key_of, rank_of, row_key, scale_draw, synth_logit, top_p_target, weight_q};
use super::{RowParams, SampleRow, SamplerConfig, TokenSampler};
use crate::KernelError;

/// Best-ranked token of a row and its logit.
pub fn row_argmax(logits: &[f32]) -> (u32, f32) {
    let mut best = 0u64;
    for (i, &l) in logits.iter().enumerate() {
        best = best.max(rank_of(key_of(l), i as u32));
    }
    let idx = index_of_rank(best);
    (idx, logits[idx as usize])
}

/// Reusable per-row scratch, so a batch allocates nothing after the first row.
#[derive(Default)]
pub struct RowScratch {
    ranks: Vec<u64>,
    weights: Vec<u64>,
}

impl RowScratch {
    pub fn with_vocab(vocab: usize) -> Self {
        Self {
            ranks: Vec::with_capacity(vocab),
            weights: Vec::with_capacity(vocab),
        }
    }

    fn fill_weights(&mut self, logits: &[f32], max_logit: f32, inv_temp: f32) {
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&l| weight_q(l, max_logit, inv_temp)));
    }

    /// Rank threshold of top-k: tokens with rank >= it are kept (0 keeps all).
    fn top_k_threshold(&mut self, logits: &[f32], top_k: u32) -> u64 {
        let vocab = logits.len();
        if top_k == 0 || top_k as usize >= vocab {
            return 0;
        }
        self.ranks.clear();
        self.ranks
            .extend(logits.iter().enumerate().map(|(i, &l)| rank_of(key_of(l), i as u32)));
        let k = top_k as usize;
        self.ranks.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
        self.ranks[k - 1]
    }

    /// Rank threshold of top-p over the tokens with rank >= `floor`
    /// (`self.weights` must hold the row's weights).
    fn top_p_threshold(&mut self, logits: &[f32], floor: u64, top_p: f32) -> u64 {
        if top_p >= 1.0 {
            return floor;
        }
        self.ranks.clear();
        let mut total = 0u64;
        for (i, &l) in logits.iter().enumerate() {
            let r = rank_of(key_of(l), i as u32);
            if r >= floor {
                self.ranks.push(r);
                total += self.weights[i];
            }
        }
        let target = top_p_target(top_p, total);
        self.ranks.sort_unstable_by(|a, b| b.cmp(a));
        let mut cum = 0u64;
        for &r in &self.ranks {
            cum += self.weights[index_of_rank(r) as usize];
            if cum >= target {
                return r;
            }
        }
        unreachable!("target {target} <= total {total} is always reached")
    }

    /// The full pipeline of one row; see the module comment.
    pub fn sample_row(&mut self, logits: &[f32], p: &RowParams) -> u32 {
        let (arg, max_logit) = row_argmax(logits);
        if p.inv_temp == 0.0 || !max_logit.is_finite() {
            return arg;
        }
        self.fill_weights(logits, max_logit, p.inv_temp);
        let floor = self.top_k_threshold(logits, p.top_k);
        let floor = self.top_p_threshold(logits, floor, p.top_p);
        let mut total = 0u64;
        for (i, &l) in logits.iter().enumerate() {
            if rank_of(key_of(l), i as u32) >= floor {
                total += self.weights[i];
            }
        }
        let r = scale_draw(p.draw, total);
        let mut cum = 0u64;
        for (i, &l) in logits.iter().enumerate() {
            if rank_of(key_of(l), i as u32) >= floor {
                cum += self.weights[i];
                if cum > r {
                    return i as u32;
                }
            }
        }
        unreachable!("draw {r} < total {total} is always passed")
    }
}

fn check_batch(logits: &[f32], vocab: usize, rows: usize, what: &'static str) -> Result<(), KernelError> {
    super::check_vocab(vocab as u64)?;
    if logits.len() != vocab * rows {
        return Err(KernelError::Shape {
            op: what,
            detail: format!("{} logits for {rows} rows of {vocab}", logits.len()),
        });
    }
    Ok(())
}

/// Temperature softmax of each row into `probs`: weight / row total, computed
/// in f64 from the fixed-point weights. Temperature 0 gives one-hot argmax.
pub fn softmax(logits: &[f32], vocab: usize, temperatures: &[f32], probs: &mut [f32]) -> Result<(), KernelError> {
    check_batch(logits, vocab, temperatures.len(), "softmax")?;
    if probs.len() != logits.len() {
        return Err(KernelError::Shape {
            op: "softmax",
            detail: "probs and logits differ in length".into(),
        });
    }
    let mut scratch = RowScratch::with_vocab(vocab);
    for (r, &t) in temperatures.iter().enumerate() {
        let inv_temp = super::inv_temperature(t)?;
        let row = &logits[r * vocab..(r + 1) * vocab];
        let out = &mut probs[r * vocab..(r + 1) * vocab];
        let (arg, max_logit) = row_argmax(row);
        if inv_temp == 0.0 || !max_logit.is_finite() {
            out.fill(0.0);
            out[arg as usize] = 1.0;
            continue;
        }
        scratch.fill_weights(row, max_logit, inv_temp);
        let total: u64 = scratch.weights.iter().sum();
        for (o, &w) in out.iter_mut().zip(&scratch.weights) {
            *o = (w as f64 / total as f64) as f32;
        }
    }
    Ok(())
}

/// Sets every logit outside the row's top `k` ranks to -inf (k 0: keep all).
pub fn top_k_filter(logits: &mut [f32], vocab: usize, ks: &[u32]) -> Result<(), KernelError> {
    check_batch(logits, vocab, ks.len(), "top_k_filter")?;
    let mut scratch = RowScratch::with_vocab(vocab);
    for (r, &k) in ks.iter().enumerate() {
        let row = &mut logits[r * vocab..(r + 1) * vocab];
        let floor = scratch.top_k_threshold(row, k);
        mask_below(row, floor);
    }
    Ok(())
}

/// Sets every logit outside the row's top-p nucleus (temperature softmax) to
/// -inf; temperature 0 keeps only the argmax.
pub fn top_p_filter(logits: &mut [f32], vocab: usize, temperatures: &[f32], top_ps: &[f32]) -> Result<(), KernelError> {
    check_batch(logits, vocab, temperatures.len(), "top_p_filter")?;
    if top_ps.len() != temperatures.len() {
        return Err(KernelError::Shape {
            op: "top_p_filter",
            detail: "one top_p per temperature".into(),
        });
    }
    let mut scratch = RowScratch::with_vocab(vocab);
    for (r, (&t, &p)) in temperatures.iter().zip(top_ps).enumerate() {
        let inv_temp = super::inv_temperature(t)?;
        super::check_top_p(p)?;
        let row = &mut logits[r * vocab..(r + 1) * vocab];
        let (arg, max_logit) = row_argmax(row);
        let floor = if inv_temp == 0.0 || !max_logit.is_finite() {
            rank_of(key_of(max_logit), arg)
        } else {
            scratch.fill_weights(row, max_logit, inv_temp);
            scratch.top_p_threshold(row, 0, p)
        };
        mask_below(row, floor);
    }
    Ok(())
}

fn mask_below(row: &mut [f32], floor: u64) {
    for (i, l) in row.iter_mut().enumerate() {
        if rank_of(key_of(*l), i as u32) < floor {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// Argmax of each row (lowest index among equal logits).
pub fn argmax(logits: &[f32], vocab: usize, out_ids: &mut [u32]) -> Result<(), KernelError> {
    check_batch(logits, vocab, out_ids.len(), "argmax")?;
    for (r, id) in out_ids.iter_mut().enumerate() {
        *id = row_argmax(&logits[r * vocab..(r + 1) * vocab]).0;
    }
    Ok(())
}

/// Temperature, top-k, top-p and the seeded draw over caller-supplied logits.
pub fn sample(logits: &[f32], vocab: usize, rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError> {
    check_batch(logits, vocab, rows.len(), "sample")?;
    if out_ids.len() != rows.len() {
        return Err(KernelError::Shape {
            op: "sample",
            detail: "one output id per row".into(),
        });
    }
    let mut scratch = RowScratch::with_vocab(vocab);
    for (r, row) in rows.iter().enumerate() {
        let p = RowParams::from_row(row)?;
        out_ids[r] = scratch.sample_row(&logits[r * vocab..(r + 1) * vocab], &p);
    }
    Ok(())
}

/// Generates each row's logits from (seed, position) into `out`.
pub fn synth_logits(vocab: usize, rows: &[SampleRow], out: &mut [f32]) -> Result<(), KernelError> {
    check_batch(out, vocab, rows.len(), "synth_logits")?;
    for (r, row) in rows.iter().enumerate() {
        let key = row_key(row.seed, row.position);
        for (i, l) in out[r * vocab..(r + 1) * vocab].iter_mut().enumerate() {
            *l = synth_logit(key, i as u32);
        }
    }
    Ok(())
}

/// The CPU twin of `BatchSampler`: same interface, same token ids. Buffers
/// are allocated once for `max_batch` rows.
pub struct CpuSampler {
    config: SamplerConfig,
    logits: Vec<f32>,
    scratch: RowScratch,
}

impl CpuSampler {
    pub fn new(config: SamplerConfig) -> Result<Self, KernelError> {
        config.check()?;
        let vocab = config.vocab as usize;
        Ok(Self {
            config,
            logits: vec![0.0; vocab],
            scratch: RowScratch::with_vocab(vocab),
        })
    }
}

impl TokenSampler for CpuSampler {
    fn config(&self) -> SamplerConfig {
        self.config
    }

    fn sample(&mut self, rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError> {
        self.config.check_call(rows, out_ids)?;
        for (row, id) in rows.iter().zip(out_ids.iter_mut()) {
            let p = RowParams::from_row(row)?;
            let key = row_key(row.seed, row.position);
            for (i, l) in self.logits.iter_mut().enumerate() {
                *l = synth_logit(key, i as u32);
            }
            *id = self.scratch.sample_row(&self.logits, &p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seed: u64, temperature: f32, top_k: u32, top_p: f32) -> SampleRow {
        SampleRow {
            seed,
            position: 3,
            temperature,
            top_k,
            top_p,
        }
    }

    fn logits_of(vocab: usize, rows: &[SampleRow]) -> Vec<f32> {
        let mut l = vec![0.0; vocab * rows.len()];
        synth_logits(vocab, rows, &mut l).unwrap();
        l
    }

    #[test]
    fn temperature_zero_is_argmax_with_lowest_index_on_ties() {
        let logits = [1.0, 5.0, 2.0, 5.0];
        let mut ids = [9];
        sample(&logits, 4, &[row(1, 0.0, 0, 1.0)], &mut ids).unwrap();
        assert_eq!(ids, [1]);
        argmax(&logits, 4, &mut ids).unwrap();
        assert_eq!(ids, [1]);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_follow_temperature() {
        let vocab = 1000;
        let rows = [row(1, 1.0, 0, 1.0), row(2, 0.5, 0, 1.0)];
        let logits = logits_of(vocab, &rows);
        let mut probs = vec![0.0; logits.len()];
        softmax(&logits, vocab, &[1.0, 0.5], &mut probs).unwrap();
        for r in 0..2 {
            let row = &probs[r * vocab..(r + 1) * vocab];
            let sum: f64 = row.iter().map(|&p| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5, "row {r} sums to {sum}");
            let lr = &logits[r * vocab..(r + 1) * vocab];
            let t = [1.0f64, 0.5][r];
            let m = lr.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let z: f64 = lr.iter().map(|&l| ((l as f64 - m) / t).exp()).sum();
            for (i, &p) in row.iter().enumerate() {
                let want = ((lr[i] as f64 - m) / t).exp() / z;
                assert!(
                    (p as f64 - want).abs() < 1e-6 + want * 1e-5,
                    "row {r} token {i}: {p} vs {want}"
                );
            }
        }
        softmax(&logits, vocab, &[0.0, 1.0], &mut probs).unwrap();
        assert_eq!(probs[..vocab].iter().filter(|&&p| p == 1.0).count(), 1);
    }

    #[test]
    fn top_k_keeps_exactly_k_with_ties_resolved_by_index() {
        let mut logits = vec![1.0, 3.0, 3.0, 2.0, 3.0, 0.5];
        top_k_filter(&mut logits, 6, &[2]).unwrap();
        let kept: Vec<usize> = (0..6).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, vec![1, 2]);

        let vocab = 4096;
        let rows = [row(5, 1.0, 0, 1.0)];
        let mut l = logits_of(vocab, &rows);
        let orig = l.clone();
        top_k_filter(&mut l, vocab, &[50]).unwrap();
        assert_eq!(l.iter().filter(|x| x.is_finite()).count(), 50);
        let min_kept = l.iter().cloned().filter(|x| x.is_finite()).fold(f32::MAX, f32::min);
        let above = orig.iter().filter(|&&x| x > min_kept).count();
        assert!(above < 50);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        let vocab = 8192;
        let rows = [row(9, 0.7, 0, 0.9)];
        let logits = logits_of(vocab, &rows);
        let mut probs = vec![0.0; vocab];
        softmax(&logits, vocab, &[0.7], &mut probs).unwrap();
        let mut filtered = logits.clone();
        top_p_filter(&mut filtered, vocab, &[0.7], &[0.9]).unwrap();
        let kept_mass: f64 = (0..vocab)
            .filter(|&i| filtered[i].is_finite())
            .map(|i| probs[i] as f64)
            .sum();
        let min_kept = (0..vocab)
            .filter(|&i| filtered[i].is_finite())
            .map(|i| probs[i] as f64)
            .fold(1.0, f64::min);
        assert!(kept_mass >= 0.9 - 1e-6, "kept {kept_mass}");
        assert!(
            kept_mass - min_kept < 0.9 + 1e-6,
            "prefix not minimal: {kept_mass} - {min_kept}"
        );
    }

    #[test]
    fn fused_sampling_equals_the_composed_filters() {
        let vocab = 5000;
        let rows: Vec<SampleRow> = (0..40)
            .map(|s| {
                row(
                    s,
                    [0.0, 0.3, 1.0, 1.7][s as usize % 4],
                    [0, 1, 40, 5000][s as usize / 4 % 4],
                    [1.0, 0.5, 0.95][s as usize % 3],
                )
            })
            .collect();
        let logits = logits_of(vocab, &rows);
        let mut fused = vec![0; rows.len()];
        sample(&logits, vocab, &rows, &mut fused).unwrap();

        let mut composed_logits = logits.clone();
        let ks: Vec<u32> = rows.iter().map(|r| r.top_k).collect();
        let temps: Vec<f32> = rows.iter().map(|r| r.temperature).collect();
        let ps: Vec<f32> = rows.iter().map(|r| r.top_p).collect();
        top_k_filter(&mut composed_logits, vocab, &ks).unwrap();
        top_p_filter(&mut composed_logits, vocab, &temps, &ps).unwrap();
        let plain: Vec<SampleRow> = rows
            .iter()
            .map(|r| SampleRow {
                top_k: 0,
                top_p: 1.0,
                ..*r
            })
            .collect();
        let mut composed = vec![0; rows.len()];
        sample(&composed_logits, vocab, &plain, &mut composed).unwrap();
        assert_eq!(fused, composed);
    }

    #[test]
    fn sampling_follows_the_softmax_distribution() {
        // 4 tokens with probabilities 0.1 0.2 0.3 0.4: 40k seeded draws land
        // within 1.5% of each probability.
        let logits: Vec<f32> = [0.1f32, 0.2, 0.3, 0.4].iter().map(|p| p.ln()).collect();
        let draws = 40_000;
        let mut counts = [0usize; 4];
        let mut scratch = RowScratch::with_vocab(4);
        for seed in 0..draws {
            let p = RowParams::from_row(&row(seed, 1.0, 0, 1.0)).unwrap();
            counts[scratch.sample_row(&logits, &p) as usize] += 1;
        }
        for (i, want) in [0.1, 0.2, 0.3, 0.4].iter().enumerate() {
            let got = counts[i] as f64 / draws as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let vocab = 3000;
        let rows: Vec<SampleRow> = (0..20).map(|s| row(s, 1.3, 1, 1.0)).collect();
        let logits = logits_of(vocab, &rows);
        let mut a = vec![0; 20];
        let mut b = vec![0; 20];
        sample(&logits, vocab, &rows, &mut a).unwrap();
        argmax(&logits, vocab, &mut b).unwrap();
        assert_eq!(a, b);
        let rows: Vec<SampleRow> = (0..20).map(|s| row(s, 1.3, 0, 0.0)).collect();
        sample(&logits, vocab, &rows, &mut a).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn cpu_sampler_matches_the_batch_functions() {
        let config = SamplerConfig {
            vocab: 2048,
            max_batch: 8,
        };
        let mut s = CpuSampler::new(config).unwrap();
        let rows: Vec<SampleRow> = (0..8).map(|i| row(100 + i, 0.9, 50, 0.9)).collect();
        let mut ids = vec![0; 8];
        s.sample(&rows, &mut ids).unwrap();
        let logits = logits_of(2048, &rows);
        let mut want = vec![0; 8];
        sample(&logits, 2048, &rows, &mut want).unwrap();
        assert_eq!(ids, want);
        assert!(s.sample(&[row(1, -1.0, 0, 1.0)], &mut ids[..1]).is_err());
        assert!(s.sample(&[row(1, 1.0, 0, f32::NAN)], &mut ids[..1]).is_err());
        let too_many: Vec<SampleRow> = (0..9).map(|i| row(i, 1.0, 0, 1.0)).collect();
        assert!(s.sample(&too_many, &mut [0; 9]).is_err());
    }

    #[test]
    fn non_finite_logits_are_never_sampled() {
        let logits = [f32::NAN, f32::NEG_INFINITY, 0.5, f32::INFINITY, 0.25];
        let mut ids = [0];
        for seed in 0..200 {
            sample(&logits, 5, &[row(seed, 1.0, 0, 1.0)], &mut ids).unwrap();
            assert!(ids[0] == 2 || ids[0] == 4, "sampled {}", ids[0]);
        }
    }
}
