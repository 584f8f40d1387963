//! Issue 13, item 7: the fair CPU side of the GPU sampling comparison. The
//! vectorised, multi-threaded `ParallelCpuSampler` must sample exactly the
//! ids of the one-core reference `CpuSampler`, at every SIMD level this CPU
//! runs and any thread count; `FastRow` must match `RowScratch` on
//! caller-supplied rows with ties and non-finite logits.

use cnse_kernels::sampling::cpu::RowScratch;
use cnse_kernels::sampling::RowParams;
use cnse_kernels::{CpuSampler, FastRow, ParallelCpuSampler, SampleRow, SamplerConfig, Simd, TokenSampler};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[(self.next() % v.len() as u64) as usize]
    }
}

const TEMPERATURES: [f32; 7] = [0.0, 0.05, 0.3, 0.8, 1.0, 1.7, 25.0];
const TOP_PS: [f32; 7] = [1.0, 0.0, 1e-6, 0.5, 0.9, 0.95, 0.999];

fn random_rows(rng: &mut Rng, n: usize, vocab: u32) -> Vec<SampleRow> {
    let top_ks = [0, 1, 2, 50, vocab - 1, vocab, vocab + 7];
    (0..n)
        .map(|_| SampleRow {
            seed: rng.next(),
            position: rng.next() % 4096,
            temperature: rng.pick(&TEMPERATURES),
            top_k: rng.pick(&top_ks),
            top_p: rng.pick(&TOP_PS),
        })
        .collect()
}

fn reference_ids(vocab: u32, rows: &[SampleRow]) -> Vec<u32> {
    let config = SamplerConfig {
        vocab,
        max_batch: rows.len(),
    };
    let mut cpu = CpuSampler::new(config).unwrap();
    let mut ids = vec![0; rows.len()];
    cpu.sample(rows, &mut ids).unwrap();
    ids
}

#[test]
fn issue13_parallel_sampler_gives_the_reference_ids() {
    let mut rng = Rng(0x1357_9BDF_2468_ACE0);
    for vocab in [1u32, 2, 17, 5000, 32768] {
        let rows = random_rows(&mut rng, 96, vocab);
        let want = reference_ids(vocab, &rows);
        for simd in Simd::available() {
            for threads in [1, 2, 3] {
                let config = SamplerConfig { vocab, max_batch: 96 };
                let mut s = ParallelCpuSampler::with_simd(config, threads, simd).unwrap();
                let mut ids = vec![u32::MAX; rows.len()];
                s.sample(&rows, &mut ids).unwrap();
                for (i, (got, want)) in ids.iter().zip(&want).enumerate() {
                    assert_eq!(
                        got, want,
                        "vocab {vocab} {simd:?} threads {threads} row {i}: {:?}",
                        rows[i]
                    );
                }
            }
        }
    }
}

#[test]
fn issue13_parallel_sampler_matches_at_the_benchmark_shape() {
    // 131,072 tokens, the four rows of `gpu bench-sampling`, plus mixes.
    let vocab = 131_072;
    let mut rows: Vec<SampleRow> = Vec::new();
    for (t, k, p) in [(0.8, 50, 0.95), (1.0, 0, 0.9), (1.0, 0, 1.0), (0.0, 0, 1.0)] {
        rows.extend((0..4u64).map(|r| SampleRow {
            seed: 1000 + r,
            position: 100,
            temperature: t,
            top_k: k,
            top_p: p,
        }));
    }
    rows.extend(random_rows(&mut Rng(99), 16, vocab));
    let want = reference_ids(vocab, &rows);
    let config = SamplerConfig {
        vocab,
        max_batch: rows.len(),
    };
    let mut s = ParallelCpuSampler::new(config, 0).unwrap();
    let mut ids = vec![0; rows.len()];
    s.sample(&rows, &mut ids).unwrap();
    assert_eq!(ids, want);
}

/// Rows that break naive float code: few distinct values (ties everywhere),
/// NaN, ±inf, ±f32::MAX, subnormals, all non-finite, all equal.
fn hostile_row(rng: &mut Rng, vocab: usize) -> Vec<f32> {
    let kind = rng.next() % 6;
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        -f32::MAX,
        1e-42,
        -0.0,
    ];
    (0..vocab)
        .map(|_| match kind {
            0 => (rng.next() % 4) as f32 * 0.5,
            1 => rng.pick(&specials),
            2 => f32::NAN,
            3 => 1.25,
            4 if rng.next().is_multiple_of(8) => rng.pick(&specials),
            _ => ((rng.next() >> 40) as f32 / 16_777_216.0) * 20.0 - 10.0,
        })
        .collect()
}

#[test]
fn issue13_vectorised_rows_match_the_reference_on_ties_and_non_finite_logits() {
    let mut rng = Rng(0xDEAD_BEEF_CAFE_F00D);
    for simd in Simd::available() {
        for vocab in [1usize, 3, 64, 257, 4096] {
            let mut fast = FastRow::with_simd(vocab, simd).unwrap();
            let mut reference = RowScratch::with_vocab(vocab);
            for n in 0..300 {
                let logits = hostile_row(&mut rng, vocab);
                let row = random_rows(&mut rng, 1, vocab as u32)[0];
                let p = RowParams::from_row(&row).unwrap();
                assert_eq!(
                    fast.sample_logits(&logits, &p),
                    reference.sample_row(&logits, &p),
                    "{simd:?} vocab {vocab} case {n} row {row:?}"
                );
            }
        }
    }
}

#[test]
fn issue13_parallel_sampler_runs_many_batches_and_refuses_bad_rows() {
    let vocab = 2048;
    let config = SamplerConfig { vocab, max_batch: 33 };
    let mut s = ParallelCpuSampler::new(config, 4).unwrap();
    assert_eq!(s.threads(), 4);
    let mut rng = Rng(7);
    for n in [0usize, 1, 2, 5, 33, 8, 33] {
        let rows = random_rows(&mut rng, n, vocab);
        let mut ids = vec![u32::MAX; n];
        s.sample(&rows, &mut ids).unwrap();
        let want = if n == 0 {
            Vec::new()
        } else {
            reference_ids(vocab, &rows)
        };
        assert_eq!(ids, want);
    }
    let bad_temperature = SampleRow {
        seed: 1,
        position: 0,
        temperature: -1.0,
        top_k: 0,
        top_p: 1.0,
    };
    let bad_top_p = SampleRow {
        top_p: f32::NAN,
        temperature: 1.0,
        ..bad_temperature
    };
    assert!(s.sample(&[bad_temperature], &mut [0]).is_err());
    assert!(s.sample(&[bad_top_p, bad_top_p], &mut [0, 0]).is_err());
    let too_many = random_rows(&mut rng, 34, vocab);
    assert!(s.sample(&too_many, &mut [0; 34]).is_err());
    assert!(s.sample(&too_many[..2], &mut [0; 3]).is_err());
    assert!(ParallelCpuSampler::new(config, 100_000).is_err());
}
