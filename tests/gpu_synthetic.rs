//! The sampling kernels on the live token path (issue 5, item 5):
//! `serve --synthetic-device cpu-sampler|cuda` streams tokens sampled from
//! generated logits, and what a client receives equals the CPU reference
//! sampler's choice for every position. Without a GPU the cuda part is
//! skipped with a printed reason and the server refuses `cuda` in one line.

mod common;

use cnse_backend::synthetic::{prompt_hash, Vocab};
use cnse_kernels::{CpuSampler, SampleRow, SamplerConfig, TokenSampler};
use cnse_proto::{Kind, Params};
use common::*;

const VOCAB: u32 = 4096;

fn expected(prompt: &str, p: &Params) -> Vec<u8> {
    let mut s = CpuSampler::new(SamplerConfig {
        vocab: VOCAB,
        max_batch: 64,
    })
    .unwrap();
    let vocab = Vocab::new();
    let mut text = Vec::new();
    let mut id = [0u32];
    for position in 0..u64::from(p.max_tokens) {
        let row = SampleRow {
            seed: prompt_hash(prompt) ^ p.seed,
            position,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        };
        s.sample(&[row], &mut id).unwrap();
        text.extend_from_slice(vocab.word(id[0]));
    }
    text
}

fn stream_text(s: &Server, id: u64, p: &Params, prompt: &str) -> Vec<u8> {
    let mut c = s.client();
    c.request(id, 0, p, prompt).unwrap();
    let frames = read_stream(&mut c, id);
    assert_eq!(frames.last().unwrap().kind, Kind::End, "{frames:?}");
    frames
        .iter()
        .filter(|f| f.kind == Kind::Tokens)
        .flat_map(|f| f.payload.clone())
        .collect()
}

fn cases() -> Vec<Params> {
    vec![
        Params {
            max_tokens: 24,
            temperature: 0.0,
            ..Params::default()
        },
        Params {
            max_tokens: 24,
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            seed: 7,
            ..Params::default()
        },
        Params {
            max_tokens: 24,
            temperature: 1.3,
            top_k: 0,
            top_p: 0.5,
            seed: 99,
            ..Params::default()
        },
    ]
}

fn check_device(device: &str) {
    let s = Server::start(&strs(
        &[
            synthetic(0, 0),
            vec![
                "--synthetic-device".into(),
                device.into(),
                "--synthetic-vocab".into(),
                VOCAB.to_string(),
            ],
        ]
        .concat(),
    ));
    for (i, p) in cases().iter().enumerate() {
        let got = stream_text(&s, i as u64 + 1, p, "sample me");
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected("sample me", p)),
            "{device}, case {p:?}"
        );
    }
    // Many streams at once: one batch per loop turn across streams.
    let mut c = s.client();
    let p = &cases()[1];
    for id in 1..=64u64 {
        c.request(id, 0, &Params { seed: id, ..*p }, "batch").unwrap();
    }
    let mut texts = vec![Vec::new(); 65];
    let mut ended = 0;
    while ended < 64 {
        let f = c.next_frame().unwrap();
        match f.kind {
            Kind::Tokens => texts[f.stream_id as usize].extend_from_slice(&f.payload),
            Kind::End => ended += 1,
            k => panic!("unexpected {k:?}: {}", f.text()),
        }
    }
    for id in 1..=64u64 {
        assert_eq!(
            texts[id as usize],
            expected("batch", &Params { seed: id, ..*p }),
            "{device} stream {id}"
        );
    }
}

#[test]
fn issue5_cpu_sampler_on_the_token_path_matches_the_reference() {
    check_device("cpu-sampler");
}

#[test]
fn issue5_gpu_sampler_on_the_token_path_matches_the_cpu_reference() {
    if !cnse_kernels::device::gpu_or_skip() {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(["serve", "--listen", "127.0.0.1:0", "--synthetic-device", "cuda"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.contains("no CUDA driver"), "{err}");
        return;
    }
    check_device("cuda");
}
