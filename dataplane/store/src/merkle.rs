//! Chunk digests of format 3: the root of a small Merkle tree over the
//! chunk's leaf digests, so the leaves a GPU checks are bound to the chunk
//! digest by construction. The one definition every verifier uses (host
//! verification, pulls, upgrades, the GPU load's manifest check).
//!
//! ```text
//! leaf digest   L = SHA-256(leaf bytes)                 (plain: what `sha256.cu` computes)
//! interior node N = SHA-256(0x01 || left || right)      (65 bytes in)
//! level k + 1   = N(x0, x1), N(x2, x3), ...; an odd last node is promoted unchanged
//! chunk root    = the single node left; a chunk of one leaf: SHA-256(0x01 || L0)
//! ```
//!
//! The shape of every tree is fixed by the manifest (blob size, chunk size,
//! leaf size), so two different chunks of the same length with the same
//! root would need a SHA-256 collision. The 0x01 prefix keeps interior
//! nodes apart from leaf digests, and the one-leaf rule keeps a format-3
//! chunk digest apart from the plain SHA-256 of the chunk (format 1 and 2)
//! even when the chunk is a single leaf.

use ring::digest::{Context, SHA256};

#[cfg(test)]
use crate::digest::Digest;
use crate::digest::{from_ring, DIGEST_BYTES};

/// First byte of every interior node's input.
pub const NODE_PREFIX: u8 = 0x01;

/// How a manifest's chunk digests are defined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkScheme {
    /// Formats 1 and 2: the plain SHA-256 of the chunk's bytes.
    Plain,
    /// Format 3: the Merkle root over the chunk's leaves of `leaf_bytes`.
    Merkle { leaf_bytes: u64 },
}

/// `SHA-256(0x01 || left || right)`.
pub fn node(left: &[u8; DIGEST_BYTES], right: &[u8; DIGEST_BYTES]) -> [u8; DIGEST_BYTES] {
    // One call over one buffer: a node is two compressions, and the
    // streaming API's per-call overhead would cost as much again.
    let mut m = [0u8; 1 + 2 * DIGEST_BYTES];
    m[0] = NODE_PREFIX;
    m[1..1 + DIGEST_BYTES].copy_from_slice(left);
    m[1 + DIGEST_BYTES..].copy_from_slice(right);
    from_ring(ring::digest::digest(&SHA256, &m)).0
}

/// `SHA-256(0x01 || leaf)`: the root of a chunk of one leaf.
fn lone(leaf: &[u8; DIGEST_BYTES]) -> [u8; DIGEST_BYTES] {
    let mut m = [0u8; 1 + DIGEST_BYTES];
    m[0] = NODE_PREFIX;
    m[1..].copy_from_slice(leaf);
    from_ring(ring::digest::digest(&SHA256, &m)).0
}

/// Builds a root from leaf digests given one at a time: a stack of
/// complete subtrees (at most one per height), merged like a binary
/// counter; `finish` folds what is left from the right, which gives the
/// level-by-level tree above with its odd nodes promoted.
#[derive(Debug, Default, Clone)]
pub struct RootBuilder {
    stack: Vec<([u8; DIGEST_BYTES], u32)>,
    leaves: u64,
}

impl RootBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, leaf: [u8; DIGEST_BYTES]) {
        self.leaves += 1;
        let mut cur = (leaf, 0u32);
        while let Some(&(top, height)) = self.stack.last() {
            if height != cur.1 {
                break;
            }
            self.stack.pop();
            cur = (node(&top, &cur.0), height + 1);
        }
        self.stack.push(cur);
    }

    /// Leaves pushed so far.
    pub fn leaves(&self) -> u64 {
        self.leaves
    }

    /// The root; panics on a builder with no leaf (a chunk has at least one).
    pub fn finish(mut self) -> [u8; DIGEST_BYTES] {
        assert!(self.leaves > 0, "a chunk has at least one leaf");
        if self.leaves == 1 {
            return lone(&self.stack[0].0);
        }
        let (mut acc, _) = self.stack.pop().expect("non-empty");
        while let Some((left, _)) = self.stack.pop() {
            acc = node(&left, &acc);
        }
        acc
    }
}

/// The root over one chunk's leaf digests (at least one).
pub fn root(leaves: &[[u8; DIGEST_BYTES]]) -> [u8; DIGEST_BYTES] {
    let mut b = RootBuilder::new();
    for l in leaves {
        b.push(*l);
    }
    b.finish()
}

/// The chunk digests that a blob's leaf digests define: one root per run
/// of `leaves_per_chunk` leaves (the last run may be shorter).
pub fn chunk_roots(leaves: &[[u8; DIGEST_BYTES]], leaves_per_chunk: u64) -> Vec<[u8; DIGEST_BYTES]> {
    assert!(leaves_per_chunk > 0);
    leaves.chunks(leaves_per_chunk as usize).map(root).collect()
}

/// The first chunk whose digest in `chunk_digests` is not the root of its
/// leaves, or `None` when every one is; also `Some` when the counts do not
/// fit together (the first chunk without a matching leaf run).
pub fn first_unbound_chunk(
    chunk_digests: &[[u8; DIGEST_BYTES]],
    leaves: &[[u8; DIGEST_BYTES]],
    leaves_per_chunk: u64,
) -> Option<u64> {
    assert!(leaves_per_chunk > 0);
    let runs = leaves.chunks(leaves_per_chunk as usize);
    if runs.len() != chunk_digests.len() {
        return Some(runs.len().min(chunk_digests.len()) as u64);
    }
    runs.zip(chunk_digests)
        .position(|(run, want)| &root(run) != want)
        .map(|i| i as u64)
}

/// Hashes one chunk given in pieces of any size, by `scheme`.
pub struct ChunkHasher {
    plain: Option<Context>,
    leaf: Context,
    leaf_bytes: u64,
    leaf_filled: u64,
    tree: RootBuilder,
}

impl ChunkHasher {
    pub fn new(scheme: ChunkScheme) -> Self {
        let (plain, leaf_bytes) = match scheme {
            ChunkScheme::Plain => (Some(Context::new(&SHA256)), 0),
            ChunkScheme::Merkle { leaf_bytes } => {
                assert!(leaf_bytes > 0, "leaves are not empty");
                (None, leaf_bytes)
            }
        };
        Self {
            plain,
            leaf: Context::new(&SHA256),
            leaf_bytes,
            leaf_filled: 0,
            tree: RootBuilder::new(),
        }
    }

    pub fn update(&mut self, mut bytes: &[u8]) {
        if let Some(p) = &mut self.plain {
            p.update(bytes);
            return;
        }
        while !bytes.is_empty() {
            let take = ((self.leaf_bytes - self.leaf_filled) as usize).min(bytes.len());
            self.leaf.update(&bytes[..take]);
            self.leaf_filled += take as u64;
            bytes = &bytes[take..];
            if self.leaf_filled == self.leaf_bytes {
                let done = std::mem::replace(&mut self.leaf, Context::new(&SHA256));
                self.tree.push(from_ring(done.finish()).0);
                self.leaf_filled = 0;
            }
        }
    }

    /// The chunk digest. A chunk of no bytes does not exist in a blob; its
    /// Merkle "digest" is taken as one empty leaf's.
    pub fn finish(mut self) -> [u8; DIGEST_BYTES] {
        if let Some(p) = self.plain {
            return from_ring(p.finish()).0;
        }
        if self.leaf_filled > 0 || self.tree.leaves() == 0 {
            self.tree.push(from_ring(self.leaf.finish()).0);
        }
        self.tree.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, written level by level as the module docs say.
    fn reference(leaves: &[[u8; 32]]) -> [u8; 32] {
        if leaves.len() == 1 {
            return lone(&leaves[0]);
        }
        let mut level = leaves.to_vec();
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|p| if p.len() == 2 { node(&p[0], &p[1]) } else { p[0] })
                .collect();
        }
        level[0]
    }

    fn leaves(n: usize) -> Vec<[u8; 32]> {
        (0..n).map(|i| Digest::of(&(i as u64).to_le_bytes()).0).collect()
    }

    #[test]
    fn issue15_root_equals_the_level_by_level_definition() {
        for n in 1..=300 {
            assert_eq!(root(&leaves(n)), reference(&leaves(n)), "{n} leaves");
        }
    }

    #[test]
    fn issue15_small_trees_by_hand() {
        let l = leaves(3);
        let mut one = vec![NODE_PREFIX];
        one.extend_from_slice(&l[0]);
        assert_eq!(root(&l[..1]), Digest::of(&one).0);
        assert_ne!(root(&l[..1]), l[0], "a one-leaf root is not the plain digest");
        let mut two = vec![NODE_PREFIX];
        two.extend_from_slice(&l[0]);
        two.extend_from_slice(&l[1]);
        assert_eq!(root(&l[..2]), Digest::of(&two).0);
        // Three leaves: the third is promoted, then joined.
        assert_eq!(root(&l), node(&node(&l[0], &l[1]), &l[2]));
    }

    #[test]
    fn issue15_chunk_hasher_matches_leaves_and_root_for_any_split() {
        let data: Vec<u8> = (0..(5 * 4096 + 77)).map(|i| (i * 13 + i / 300) as u8).collect();
        let want_leaves: Vec<[u8; 32]> = data.chunks(4096).map(|c| Digest::of(c).0).collect();
        let want = root(&want_leaves);
        for piece in [1, 63, 4096, 5000, data.len()] {
            let mut h = ChunkHasher::new(ChunkScheme::Merkle { leaf_bytes: 4096 });
            for p in data.chunks(piece) {
                h.update(p);
            }
            assert_eq!(h.finish(), want, "pieces of {piece}");
        }
        let mut h = ChunkHasher::new(ChunkScheme::Plain);
        h.update(&data);
        assert_eq!(h.finish(), Digest::of(&data).0);
    }

    #[test]
    fn issue15_unbound_chunks_are_found() {
        let l = leaves(10);
        let roots = chunk_roots(&l, 4);
        assert_eq!(roots.len(), 3);
        assert_eq!(roots[2], root(&l[8..]));
        assert_eq!(first_unbound_chunk(&roots, &l, 4), None);
        let mut bad = l.clone();
        bad[5][0] ^= 1;
        assert_eq!(first_unbound_chunk(&roots, &bad, 4), Some(1));
        assert_eq!(first_unbound_chunk(&roots[..2], &l, 4), Some(2));
    }
}
