//! Micro-benchmarks of the hot paths (issue 13), with divan: the header
//! view and its checks, the frame decoder over a byte stream, TOKENS
//! encoding, one llama-server SSE line, manifest access in the model store
//! (rkyv, zero-copy), chunk hashing (ring SHA-256 over 64 KiB leaves,
//! the Merkle root over them), and one whole loop turn of the session
//! layer without a kernel (`session_turn` over the binary protocol,
//! `session_turn_http` over the OpenAI front; `micro/session.rs`): the
//! user-space part of a request's server time, beside `peer_session_turn`,
//! the same turn through the peers' protocol code. `scripts/session-ir.sh`
//! counts their instructions per turn.
//!
//! ```sh
//! cargo bench --bench micro                       # every benchmark
//! cargo bench --bench micro -- frame              # those whose name matches
//! cargo bench --bench micro -- --sample-count 10  # quicker (scripts/bench.sh --quick)
//! ```

use std::path::Path;

use cnse_proto::{put_tokens, Direction, FrameDecoder, Header, Kind, HEADER_BYTES, PAYLOAD_BYTES_MAX_DEFAULT};
use cnse_store::{merkle, ChunkScheme, Digest, Manifest, ManifestRecord, DIGEST_BYTES};
use divan::{black_box, counter::BytesCount, counter::ItemsCount, Bencher};

#[path = "micro/session.rs"]
mod session;

fn main() {
    divan::main();
}

/// Frames per decode batch: a full turn's worth of TOKENS on one
/// connection.
const FRAMES: usize = 64;
/// Tokens per TOKENS frame (the zero-delay backend's 16-token requests).
const TOKENS_PER_FRAME: u32 = 16;
const LEAF_BYTES: usize = 64 * 1024;
/// A 16 MiB chunk: 256 leaves of 64 KiB.
const CHUNK_BYTES: usize = 16 << 20;

fn token_text() -> Vec<u8> {
    cnse_backend::synthetic::expected_text("Write a haiku about the sea.", 1, TOKENS_PER_FRAME)
}

#[divan::bench]
fn header_parse(b: Bencher) {
    let mut frame = Vec::new();
    put_tokens(&mut frame, 7, TOKENS_PER_FRAME, 0, &token_text());
    let bytes: [u8; HEADER_BYTES] = frame[..HEADER_BYTES].try_into().expect("a header");
    b.bench(|| {
        let h = Header::view(black_box(&bytes)).expect("32 bytes");
        let kind = h.validate(PAYLOAD_BYTES_MAX_DEFAULT, Direction::ToClient);
        (kind, h.stream_id(), h.payload_len())
    });
}

#[divan::bench]
fn frame_decode(b: Bencher) {
    let text = token_text();
    let mut stream = Vec::new();
    for i in 0..FRAMES {
        put_tokens(&mut stream, i as u64 + 1, TOKENS_PER_FRAME, 0, &text);
    }
    let mut d = FrameDecoder::new(Direction::ToClient, PAYLOAD_BYTES_MAX_DEFAULT);
    b.counter(ItemsCount::new(FRAMES)).bench_local(|| {
        let mut input = black_box(&stream[..]);
        let mut tokens = 0u32;
        while let Some(f) = d.next(&mut input).expect("valid frames") {
            debug_assert_eq!(f.kind, Kind::Tokens);
            tokens += f.header.arg();
        }
        tokens
    });
}

#[divan::bench]
fn token_encode(b: Bencher) {
    let text = token_text();
    let mut out = Vec::with_capacity(FRAMES * (HEADER_BYTES + text.len()));
    b.counter(ItemsCount::new(FRAMES)).bench_local(|| {
        out.clear();
        for i in 0..FRAMES as u64 {
            put_tokens(&mut out, i + 1, TOKENS_PER_FRAME, i * 16, black_box(&text));
        }
        out.len()
    });
}

#[divan::bench(args = ["token", "last"])]
fn sse_parse(b: Bencher, which: &str) {
    let line: &[u8] = match which {
        "token" => br#"data: {"index":0,"content":" the","tokens":[279],"stop":false,"id_slot":-1,"tokens_predicted":3,"tokens_evaluated":5}"#,
        _ => br#"data: {"content":"","tokens":[],"stop":true,"stop_type":"limit","stopping_word":"","tokens_predicted":16}"#,
    };
    b.counter(BytesCount::new(line.len())).bench(|| {
        cnse_llama::sse::parse_line(black_box(line)).map(|l| matches!(l, cnse_llama::sse::SseLine::Event(_)))
    });
}

/// The manifest of a 1 GiB model: 64 chunks of 16 MiB, 16,384 leaves.
fn manifest_bytes() -> Vec<u8> {
    let size: u64 = 1 << 30;
    let leaves: Vec<[u8; DIGEST_BYTES]> = (0..size / LEAF_BYTES as u64)
        .map(|i| {
            ring::digest::digest(&ring::digest::SHA256, &i.to_le_bytes())
                .as_ref()
                .try_into()
                .expect("32")
        })
        .collect();
    ManifestRecord::new(
        Digest([7; DIGEST_BYTES]),
        size,
        "bench:1g",
        CHUNK_BYTES as u64,
        LEAF_BYTES as u64,
        leaves,
        None,
    )
    .encode()
}

/// Opening a manifest: copy into an aligned buffer and validate the
/// archive (what a `store get` or a remote pull pays once).
#[divan::bench]
fn manifest_open(b: Bencher) {
    let bytes = manifest_bytes();
    b.counter(BytesCount::new(bytes.len()))
        .bench(|| Manifest::from_bytes(black_box(&bytes), Path::new("bench"), None).map(|m| m.chunk_count()));
}

/// Reading an open manifest: every chunk's digest and the leaf table, in
/// place (what verification reads per chunk).
#[divan::bench]
fn manifest_access(b: Bencher) {
    let m = Manifest::from_bytes(&manifest_bytes(), Path::new("bench"), None).expect("a valid manifest");
    b.bench(|| {
        let chunks = black_box(&m).chunk_digests();
        let (leaf_bytes, leaves) = m.leaves().expect("format 3");
        (chunks[chunks.len() / 2][0], leaves.len(), leaf_bytes, m.size_bytes())
    });
}

/// SHA-256 of one 64 KiB leaf (ring).
#[divan::bench]
fn chunk_hash_leaf(b: Bencher) {
    let leaf = vec![0x5au8; LEAF_BYTES];
    b.counter(BytesCount::new(LEAF_BYTES))
        .bench(|| ring::digest::digest(&ring::digest::SHA256, black_box(&leaf)));
}

/// A 16 MiB chunk's digest as the store computes it: SHA-256 of its 256
/// leaves and the Merkle root over them.
#[divan::bench(sample_count = 20)]
fn chunk_hash_merkle(b: Bencher) {
    let chunk = vec![0xa5u8; CHUNK_BYTES];
    let scheme = ChunkScheme::Merkle {
        leaf_bytes: LEAF_BYTES as u64,
    };
    b.counter(BytesCount::new(CHUNK_BYTES))
        .bench(|| cnse_store::chunk_digest(black_box(&chunk), scheme));
}

/// The Merkle root over 256 leaf digests alone (255 node hashes).
#[divan::bench]
fn merkle_root(b: Bencher) {
    let leaves: Vec<[u8; DIGEST_BYTES]> = (0..CHUNK_BYTES / LEAF_BYTES).map(|i| [i as u8; DIGEST_BYTES]).collect();
    assert_eq!(leaves.len(), 256);
    b.bench(|| merkle::root(black_box(&leaves)));
}
