//! GPU sampling kernels against the CPU reference: the same seeds must give
//! the same token ids, and every individual kernel the same bits (issue 5).
//! Without a CUDA driver each test prints why it is skipped and passes.

use cnse_kernels::sampling::cpu;
use cnse_kernels::{BatchSampler, CpuSampler, LogitKernels, SampleRow, SamplerConfig, TokenSampler};

fn gpu_present() -> bool {
    cnse_kernels::device::gpu_or_skip()
}

/// A spread of sampling settings, including the edge values.
fn mixed_rows(n: usize, position: u64) -> Vec<SampleRow> {
    let temps = [0.0, 0.2, 0.7, 1.0, 1.5, 4.0];
    let ks = [0, 1, 2, 40, 50, 1000, 1 << 20];
    let ps = [1.0, 0.95, 0.9, 0.5, 0.1, 0.0];
    (0..n)
        .map(|i| SampleRow {
            seed: 0xC0FFEE + i as u64 * 7919,
            position: position + i as u64 % 3,
            temperature: temps[i % temps.len()],
            top_k: ks[(i / 2) % ks.len()],
            top_p: ps[(i / 3) % ps.len()],
        })
        .collect()
}

#[test]
fn batch_sampler_matches_cpu_sampler_issue_5() {
    if !gpu_present() {
        return;
    }
    for vocab in [1u32, 7, 1000, 1024, 1025, 32_768, 131_072, 262_144] {
        let config = SamplerConfig { vocab, max_batch: 96 };
        let mut gpu = BatchSampler::new(0, config).expect("GPU sampler");
        let mut cpu = CpuSampler::new(config).expect("CPU sampler");
        for step in 0..3u64 {
            let rows = mixed_rows(if vocab >= 131_072 { 48 } else { 96 }, step * 11);
            let mut g = vec![u32::MAX; rows.len()];
            let mut c = vec![u32::MAX; rows.len()];
            gpu.sample(&rows, &mut g).unwrap();
            cpu.sample(&rows, &mut c).unwrap();
            for (i, (a, b)) in g.iter().zip(&c).enumerate() {
                assert_eq!(a, b, "vocab {vocab} step {step} row {i}: {:?}", rows[i]);
            }
            assert!(g.iter().all(|&id| id < vocab));
        }
        // The device generated the same logits as the CPU formula.
        let rows = mixed_rows(4, 5);
        let mut ids = vec![0; 4];
        gpu.sample(&rows, &mut ids).unwrap();
        let mut dev = vec![0f32; 4 * vocab as usize];
        gpu.last_logits(4, &mut dev).unwrap();
        let mut host = vec![0f32; 4 * vocab as usize];
        cpu::synth_logits(vocab as usize, &rows, &mut host).unwrap();
        assert!(
            dev.iter().zip(&host).all(|(a, b)| a.to_bits() == b.to_bits()),
            "vocab {vocab}: logits differ"
        );
    }
    println!("GPU and CPU sampled identical ids for vocab 1..256k");
}

/// Logit rows that stress ties, non-finite values and flat distributions.
fn hard_logits(vocab: usize, rows: usize) -> Vec<f32> {
    let mut l = vec![0f32; vocab * rows];
    let synth_rows = mixed_rows(rows, 99);
    cpu::synth_logits(vocab, &synth_rows, &mut l).unwrap();
    for r in 0..rows {
        let row = &mut l[r * vocab..(r + 1) * vocab];
        match r % 6 {
            0 => row.iter_mut().for_each(|x| *x = (*x * 4.0).round() / 4.0), // heavy ties
            1 => row.iter_mut().for_each(|x| *x = 1.0),                      // all equal
            2 => {
                for (i, x) in row.iter_mut().enumerate() {
                    if i % 3 == 0 {
                        *x = f32::NEG_INFINITY;
                    } else if i % 7 == 0 {
                        *x = f32::NAN;
                    }
                }
            }
            3 => row.iter_mut().for_each(|x| *x *= 30.0), // very peaked
            4 => row.iter_mut().for_each(|x| *x = -*x - 1e4),
            _ => {}
        }
    }
    l
}

#[test]
fn individual_kernels_match_their_cpu_references_issue_5() {
    if !gpu_present() {
        return;
    }
    for vocab in [5usize, 1000, 50_000, 131_072] {
        let rows = 24;
        let config = SamplerConfig {
            vocab: vocab as u32,
            max_batch: rows,
        };
        let mut k = LogitKernels::new(0, config).expect("kernels");
        let logits = hard_logits(vocab, rows);
        let params = mixed_rows(rows, 1);
        let temps: Vec<f32> = params.iter().map(|r| r.temperature).collect();
        let ks: Vec<u32> = params.iter().map(|r| r.top_k).collect();
        let ps: Vec<f32> = params.iter().map(|r| r.top_p).collect();

        let mut g = vec![0f32; logits.len()];
        let mut c = vec![0f32; logits.len()];
        k.softmax(&logits, &temps, &mut g).unwrap();
        cpu::softmax(&logits, vocab, &temps, &mut c).unwrap();
        assert!(
            g.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()),
            "softmax differs, vocab {vocab}"
        );

        let (mut g, mut c) = (logits.clone(), logits.clone());
        k.top_k_filter(&mut g, &ks).unwrap();
        cpu::top_k_filter(&mut c, vocab, &ks).unwrap();
        assert!(
            g.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()),
            "top-k differs, vocab {vocab}"
        );

        let (mut g, mut c) = (logits.clone(), logits.clone());
        k.top_p_filter(&mut g, &temps, &ps).unwrap();
        cpu::top_p_filter(&mut c, vocab, &temps, &ps).unwrap();
        assert!(
            g.iter().zip(&c).all(|(a, b)| a.to_bits() == b.to_bits()),
            "top-p differs, vocab {vocab}"
        );

        let mut gi = vec![0u32; rows];
        let mut ci = vec![0u32; rows];
        k.argmax(&logits, &mut gi).unwrap();
        cpu::argmax(&logits, vocab, &mut ci).unwrap();
        assert_eq!(gi, ci, "argmax differs, vocab {vocab}");

        k.sample(&logits, &params, &mut gi).unwrap();
        cpu::sample(&logits, vocab, &params, &mut ci).unwrap();
        assert_eq!(gi, ci, "sample differs, vocab {vocab}");
    }
}

#[test]
fn gpu_rejects_bad_rows_without_launching_issue_5() {
    if !gpu_present() {
        return;
    }
    let mut gpu = BatchSampler::new(
        0,
        SamplerConfig {
            vocab: 1000,
            max_batch: 4,
        },
    )
    .unwrap();
    let mut ids = [0u32; 1];
    let bad = SampleRow {
        seed: 1,
        position: 0,
        temperature: f32::NAN,
        top_k: 0,
        top_p: 1.0,
    };
    assert!(gpu.sample(&[bad], &mut ids).is_err());
    let bad = SampleRow {
        top_p: 1.5,
        temperature: 1.0,
        ..bad
    };
    assert!(gpu.sample(&[bad], &mut ids).is_err());
    let rows = vec![
        SampleRow {
            temperature: 1.0,
            top_p: 1.0,
            ..bad
        };
        5
    ];
    assert!(gpu.sample(&rows, &mut [0; 5]).is_err());
    assert!(BatchSampler::new(
        0,
        SamplerConfig {
            vocab: 1 << 19,
            max_batch: 4
        }
    )
    .is_err());
    assert!(BatchSampler::new(
        999,
        SamplerConfig {
            vocab: 10,
            max_batch: 4
        }
    )
    .err()
    .unwrap()
    .to_string()
    .contains("device 999 not found"));
}

#[test]
fn without_a_driver_the_gpu_sampler_says_so() {
    if cnse_kernels::cuda_available() {
        println!("skipped: a CUDA driver is present");
        return;
    }
    let err = BatchSampler::new(
        0,
        SamplerConfig {
            vocab: 1000,
            max_batch: 4,
        },
    )
    .err()
    .unwrap();
    assert_eq!(err.to_string(), "no CUDA driver found (libcuda.so could not be loaded)");
}
