//! Manifests: what the store knows about a blob, archived with rkyv and read
//! in place from a read-only map after one validation pass.
//!
//! File layout: the 8 bytes [`MANIFEST_MAGIC`], then the rkyv archive of a
//! [`ManifestRecord`]. The archive starts at offset 8, so a page-aligned map
//! keeps it 8-aligned as rkyv requires.
//!
//! Format 2 added optional leaf digests (`leaves.rs`); format 3 (the one
//! written now) has the same archive layout, requires the leaves, and
//! defines each chunk digest as the Merkle root over its leaves
//! (`merkle.rs`) instead of the plain SHA-256 of the chunk. Format 2 files
//! (`CNSEMF02`) open as they are, with plain chunk digests; format 1 files
//! (`CNSEMF01`, no leaves) are validated as the frozen format-1 record and
//! converted in memory to format 2. `store upgrade` rewrites both as format 3.

use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rkyv::util::AlignedVec;

use crate::digest::{Digest, DIGEST_BYTES};
use crate::error::{IoContext, Result, StoreError};
use crate::gguf::GgufInfo;
use crate::hash::chunk_count;
use crate::leaves::{check_leaf_bytes, leaf_count};
use crate::merkle::{self, ChunkScheme};

/// First bytes of every manifest file written now; the last two digits are
/// the format version.
pub const MANIFEST_MAGIC: [u8; 8] = *b"CNSEMF03";
/// Magic of format 2 (plain chunk digests, optional leaves), still read.
pub const MANIFEST_MAGIC_V2: [u8; 8] = *b"CNSEMF02";
/// Magic of format 1 (no leaf digests), still read.
pub const MANIFEST_MAGIC_V1: [u8; 8] = *b"CNSEMF01";
/// The format `put`, `pull` and `upgrade` write.
pub const FORMAT_VERSION: u32 = 3;
/// Default chunk size: large enough that a per-chunk digest costs nothing,
/// small enough that a 1 GiB model splits over 64 cores' worth of chunks.
pub const CHUNK_BYTES_DEFAULT: u64 = 16 << 20;
pub const CHUNK_BYTES_MIN: u64 = 4096;
pub const CHUNK_BYTES_MAX: u64 = 1 << 30;
/// Longest original name kept in a manifest.
pub const NAME_BYTES_MAX: usize = 4096;
/// Largest manifest we read: 256 MiB holds the leaf digests of a 512 GiB
/// blob at the default 64 KiB leaves (512 KiB per GiB); its chunk digests
/// alone are 2 MiB per TiB.
pub const MANIFEST_BYTES_MAX: u64 = 256 << 20;

const _: () = assert!(MANIFEST_MAGIC.len() % 8 == 0, "the archive must stay 8-aligned");
const _: () = assert!(CHUNK_BYTES_DEFAULT % CHUNK_BYTES_MIN == 0);

/// The archived form of a manifest, formats 2 and 3 (same layout; the
/// format version says how `chunk_digests` are defined).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ManifestRecord {
    /// 2: chunk digests are plain SHA-256 of the chunk; 3: Merkle roots
    /// over the chunk's leaf digests, and `leaves` is required.
    pub format_version: u32,
    pub digest: [u8; DIGEST_BYTES],
    pub size_bytes: u64,
    /// The name the blob was put under: `name:tag` or the file's base name.
    pub name: String,
    pub created_unix_ms: u64,
    pub chunk_bytes: u64,
    /// One digest per chunk, defined by `format_version`.
    pub chunk_digests: Vec<[u8; DIGEST_BYTES]>,
    pub gguf: Option<GgufInfo>,
    /// SHA-256 of each leaf (always in format 3; optional in format 2, and
    /// absent in converted format-1 files until `store upgrade`).
    pub leaves: Option<LeafDigests>,
}

/// Digests of the fixed-size leaves of a blob (see `leaves.rs`).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct LeafDigests {
    pub leaf_bytes: u64,
    pub digests: Vec<[u8; DIGEST_BYTES]>,
}

/// Format 1, frozen: how manifests were archived before leaf digests.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct ManifestRecordV1 {
    pub format_version: u32,
    pub digest: [u8; DIGEST_BYTES],
    pub size_bytes: u64,
    pub name: String,
    pub created_unix_ms: u64,
    pub chunk_bytes: u64,
    pub chunk_digests: Vec<[u8; DIGEST_BYTES]>,
    pub gguf: Option<GgufInfo>,
}

impl ManifestRecordV1 {
    /// The bytes of a format-1 manifest file (tests of the upgrade path).
    pub fn encode(&self) -> Vec<u8> {
        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing to memory cannot fail");
        let mut out = MANIFEST_MAGIC_V1.to_vec();
        out.extend_from_slice(&archive);
        out
    }
}

impl From<ManifestRecordV1> for ManifestRecord {
    fn from(v: ManifestRecordV1) -> Self {
        ManifestRecord {
            format_version: 2,
            digest: v.digest,
            size_bytes: v.size_bytes,
            name: v.name,
            created_unix_ms: v.created_unix_ms,
            chunk_bytes: v.chunk_bytes,
            chunk_digests: v.chunk_digests,
            gguf: v.gguf,
            leaves: None,
        }
    }
}

impl ManifestRecord {
    /// A format-3 record: the chunk digests are derived here from the leaf
    /// digests (`leaf_bytes` checked by the caller), so they are bound to
    /// them by construction.
    pub fn new(
        digest: Digest,
        size_bytes: u64,
        name: &str,
        chunk_bytes: u64,
        leaf_bytes: u64,
        leaf_digests: Vec<[u8; DIGEST_BYTES]>,
        gguf: Option<GgufInfo>,
    ) -> ManifestRecord {
        let created_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut name = name.to_string();
        if name.len() > NAME_BYTES_MAX {
            let mut cut = NAME_BYTES_MAX;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name.truncate(cut);
        }
        ManifestRecord {
            format_version: 2,
            digest: digest.0,
            size_bytes,
            name,
            created_unix_ms,
            chunk_bytes,
            chunk_digests: Vec::new(),
            gguf,
            leaves: None,
        }
        .into_format3(leaf_bytes, leaf_digests)
    }

    /// The same record in format 3 with these leaves (computed from bytes
    /// the caller checked): the chunk digests become the Merkle roots over
    /// them. Everything else (name, creation time, GGUF facts) is kept.
    pub fn into_format3(mut self, leaf_bytes: u64, digests: Vec<[u8; DIGEST_BYTES]>) -> ManifestRecord {
        assert!(
            leaf_bytes > 0 && self.chunk_bytes % leaf_bytes == 0,
            "leaves divide chunks"
        );
        self.chunk_digests = merkle::chunk_roots(&digests, self.chunk_bytes / leaf_bytes);
        self.format_version = FORMAT_VERSION;
        self.leaves = Some(LeafDigests { leaf_bytes, digests });
        self
    }

    /// The bytes of a manifest file: the magic of the record's format (2
    /// or 3), then the archive.
    pub fn encode(&self) -> Vec<u8> {
        let magic = match self.format_version {
            2 => MANIFEST_MAGIC_V2,
            3 => MANIFEST_MAGIC,
            v => panic!("format {v} records are not written"),
        };
        let archive = rkyv::to_bytes::<rkyv::rancor::Error>(self).expect("serializing to memory cannot fail");
        let mut out = Vec::with_capacity(magic.len() + archive.len());
        out.extend_from_slice(&magic);
        out.extend_from_slice(&archive);
        out
    }
}

/// Checks that a chunk size is one the store accepts.
pub fn check_chunk_bytes(chunk_bytes: u64) -> Result<()> {
    if !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&chunk_bytes) || chunk_bytes % CHUNK_BYTES_MIN != 0 {
        return Err(StoreError::BadOption {
            option: "--chunk-bytes",
            reason: format!(
                "{chunk_bytes} is not a multiple of {CHUNK_BYTES_MIN} between {CHUNK_BYTES_MIN} and {CHUNK_BYTES_MAX}"
            ),
        });
    }
    Ok(())
}

enum Backing {
    Map(Mmap),
    Owned(AlignedVec),
}

/// A validated manifest, read in place. Cheap accessors borrow from the
/// archive; nothing is deserialized.
pub struct Manifest {
    backing: Backing,
    path: PathBuf,
    /// The format of the file it came from (1 is held converted to 2).
    format: u32,
}

impl std::fmt::Debug for Manifest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manifest")
            .field("path", &self.path)
            .field("digest", &self.digest())
            .finish()
    }
}

impl Manifest {
    /// Maps and validates the manifest file at `path`. When `expect` is given
    /// the manifest must describe that digest.
    pub fn open(path: &Path, expect: Option<&Digest>) -> Result<Manifest> {
        let file = std::fs::File::open(path).ctx("open manifest", path)?;
        let len = file.metadata().ctx("stat manifest", path)?.len();
        if len > MANIFEST_BYTES_MAX {
            return Err(bad(
                path,
                format!("{len} bytes is more than the {MANIFEST_BYTES_MAX} allowed"),
            ));
        }
        // SAFETY: manifests are written once to a temporary file and renamed
        // into place, never modified in place; a later rename leaves this
        // mapping of the old inode intact. Only an outside process truncating
        // the file in place could invalidate it, which the store's contract
        // (the directory belongs to the store) excludes.
        let map = unsafe { Mmap::map(&file) }.ctx("map manifest", path)?;
        if map.starts_with(&MANIFEST_MAGIC_V1) {
            return Manifest::from_bytes(&map, path, expect);
        }
        let m = Manifest {
            backing: Backing::Map(map),
            path: path.to_path_buf(),
            format: 0,
        }
        .with_format()?;
        m.validate(expect)?;
        Ok(m)
    }

    /// Validates manifest bytes that came from elsewhere (a remote), copying
    /// them into an aligned buffer. `origin` names them in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path, expect: Option<&Digest>) -> Result<Manifest> {
        if bytes.len() as u64 > MANIFEST_BYTES_MAX {
            return Err(bad(
                origin,
                format!("{} bytes is more than the {MANIFEST_BYTES_MAX} allowed", bytes.len()),
            ));
        }
        let mut v = AlignedVec::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        let v1 = bytes.starts_with(&MANIFEST_MAGIC_V1);
        if v1 {
            let old = rkyv::from_bytes::<ManifestRecordV1, rkyv::rancor::Error>(&v[MANIFEST_MAGIC_V1.len()..])
                .map_err(|e| bad(origin, format!("format 1 archive check failed: {e}")))?;
            let new = ManifestRecord::from(old).encode();
            v = AlignedVec::with_capacity(new.len());
            v.extend_from_slice(&new);
        }
        let mut m = Manifest {
            backing: Backing::Owned(v),
            path: origin.to_path_buf(),
            format: 0,
        }
        .with_format()?;
        m.validate(expect)?;
        if v1 {
            m.format = 1;
        }
        Ok(m)
    }

    /// Reads the format from the magic; anything else is refused here.
    fn with_format(mut self) -> Result<Manifest> {
        let bytes = self.file_bytes();
        self.format = if bytes.starts_with(&MANIFEST_MAGIC) {
            3
        } else if bytes.starts_with(&MANIFEST_MAGIC_V2) {
            2
        } else {
            return Err(bad(
                &self.path,
                "wrong magic (not a cnse-dp manifest, or a format this version does not know)".into(),
            ));
        };
        Ok(self)
    }

    /// The file bytes (magic included), e.g. to upload; a format-1 file
    /// comes back converted to format 2.
    pub fn file_bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Map(m) => m,
            Backing::Owned(v) => v,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn validate(&self, expect: Option<&Digest>) -> Result<()> {
        let bytes = self.file_bytes();
        let rec = rkyv::access::<ArchivedManifestRecord, rkyv::rancor::Error>(&bytes[MANIFEST_MAGIC.len()..])
            .map_err(|e| bad(&self.path, format!("archive check failed: {e}")))?;
        if rec.format_version.to_native() != self.format {
            return Err(bad(
                &self.path,
                format!(
                    "format version {} in a format-{} file",
                    rec.format_version.to_native(),
                    self.format
                ),
            ));
        }
        if self.format == 3 && rec.leaves.is_none() {
            return Err(bad(&self.path, "format 3 without leaf digests".into()));
        }
        let chunk_bytes = rec.chunk_bytes.to_native();
        check_chunk_bytes(chunk_bytes).map_err(|e| bad(&self.path, e.to_string()))?;
        let want = chunk_count(rec.size_bytes.to_native(), chunk_bytes);
        if rec.chunk_digests.len() as u64 != want {
            return Err(bad(
                &self.path,
                format!("{} chunk digests for {want} chunks", rec.chunk_digests.len()),
            ));
        }
        if let Some(l) = rec.leaves.as_ref() {
            let leaf_bytes = l.leaf_bytes.to_native();
            check_leaf_bytes(leaf_bytes, chunk_bytes).map_err(|e| bad(&self.path, e.to_string()))?;
            let want = leaf_count(rec.size_bytes.to_native(), leaf_bytes);
            if l.digests.len() as u64 != want {
                return Err(bad(
                    &self.path,
                    format!("{} leaf digests for {want} leaves", l.digests.len()),
                ));
            }
        }
        if let Some(d) = expect {
            if rec.digest != d.0 {
                return Err(bad(
                    &self.path,
                    format!("describes {} instead of {d}", Digest(rec.digest)),
                ));
            }
        }
        Ok(())
    }

    fn rec(&self) -> &ArchivedManifestRecord {
        // SAFETY: `validate` checked these exact bytes with `rkyv::access` when
        // the manifest was built, and the backing is immutable (a read-only
        // map of a file the store never modifies in place, or an owned buffer).
        unsafe { rkyv::access_unchecked::<ArchivedManifestRecord>(&self.file_bytes()[MANIFEST_MAGIC.len()..]) }
    }

    pub fn digest(&self) -> Digest {
        Digest(self.rec().digest)
    }
    pub fn size_bytes(&self) -> u64 {
        self.rec().size_bytes.to_native()
    }
    pub fn chunk_bytes(&self) -> u64 {
        self.rec().chunk_bytes.to_native()
    }
    pub fn chunk_count(&self) -> u64 {
        self.rec().chunk_digests.len() as u64
    }
    /// One SHA-256 per chunk, borrowed from the archive.
    pub fn chunk_digests(&self) -> &[[u8; DIGEST_BYTES]] {
        self.rec().chunk_digests.as_slice()
    }
    pub fn name(&self) -> &str {
        self.rec().name.as_str()
    }
    pub fn created_unix_ms(&self) -> u64 {
        self.rec().created_unix_ms.to_native()
    }
    /// The format of the manifest file: 1, 2 or 3.
    pub fn format(&self) -> u32 {
        self.format
    }
    /// How the chunk digests are defined: plain SHA-256 of the chunk
    /// (formats 1 and 2) or the Merkle root over its leaves (format 3).
    pub fn chunk_scheme(&self) -> ChunkScheme {
        match (self.format, self.leaves()) {
            (3, Some((leaf_bytes, _))) => ChunkScheme::Merkle { leaf_bytes },
            _ => ChunkScheme::Plain,
        }
    }
    /// Format 3: checks that every chunk digest is the Merkle root over its
    /// leaf digests, so leaves checked elsewhere (on a GPU) vouch for the
    /// chunk digests. A few hundred 65-byte hashes per chunk. Formats 1
    /// and 2 define nothing to check and pass.
    pub fn check_tree(&self) -> Result<()> {
        let (ChunkScheme::Merkle { leaf_bytes }, Some((_, leaves))) = (self.chunk_scheme(), self.leaves()) else {
            return Ok(());
        };
        match merkle::first_unbound_chunk(self.chunk_digests(), leaves, self.chunk_bytes() / leaf_bytes) {
            None => Ok(()),
            Some(c) => Err(bad(
                &self.path,
                format!("chunk {c}'s digest is not the Merkle root of its leaf digests"),
            )),
        }
    }
    /// Leaf size and one SHA-256 per leaf, when the manifest has them.
    pub fn leaves(&self) -> Option<(u64, &[[u8; DIGEST_BYTES]])> {
        let l = self.rec().leaves.as_ref()?;
        Some((l.leaf_bytes.to_native(), l.digests.as_slice()))
    }
    /// The whole record, deserialized (to rewrite it, e.g. with leaves).
    pub fn record(&self) -> ManifestRecord {
        rkyv::deserialize::<ManifestRecord, rkyv::rancor::Error>(self.rec()).expect("validated archives deserialize")
    }
    /// GGUF facts, when the blob is a GGUF file the header parser understood.
    pub fn gguf(&self) -> Option<GgufInfo> {
        let g = self.rec().gguf.as_ref()?;
        rkyv::deserialize::<GgufInfo, rkyv::rancor::Error>(g).ok()
    }
}

fn bad(path: &Path, reason: String) -> StoreError {
    StoreError::BadManifest {
        path: path.to_path_buf(),
        reason,
    }
}

#[cfg(test)]
mod tests;
