use super::*;

/// 3 × 4096 + 1 bytes in chunks of 4096 and leaves of 4096: four chunks
/// of one leaf each.
fn record() -> ManifestRecord {
    let gguf = crate::gguf::parse(&crate::gguf::tests::sample()).unwrap();
    ManifestRecord::new(
        Digest::of(b"x"),
        3 * 4096 + 1,
        "m:v1",
        4096,
        4096,
        vec![[9u8; 32]; 4],
        Some(gguf),
    )
}

/// The same blob as `record`, in format 2 (plain chunk digests).
fn record_v2() -> ManifestRecord {
    ManifestRecord {
        format_version: 2,
        chunk_digests: vec![[7u8; 32]; 4],
        ..record()
    }
}

#[test]
fn round_trip_through_bytes() {
    let rec = record();
    let bytes = rec.encode();
    assert!(bytes.starts_with(b"CNSEMF03"));
    let m = Manifest::from_bytes(&bytes, Path::new("t"), Some(&Digest::of(b"x"))).unwrap();
    assert_eq!(m.format(), 3);
    assert_eq!(m.digest(), Digest::of(b"x"));
    assert_eq!(m.size_bytes(), 3 * 4096 + 1);
    assert_eq!(m.chunk_bytes(), 4096);
    assert_eq!(m.chunk_digests(), &[merkle::root(&[[9u8; 32]]); 4][..]);
    assert_eq!(m.chunk_scheme(), ChunkScheme::Merkle { leaf_bytes: 4096 });
    assert_eq!(m.name(), "m:v1");
    assert_eq!(m.gguf().unwrap().architecture.as_deref(), Some("llama"));
    m.check_tree().unwrap();
    assert_eq!(m.record(), rec);
}

#[test]
fn rejects_wrong_digest_magic_and_garbage() {
    let bytes = record().encode();
    assert!(Manifest::from_bytes(&bytes, Path::new("t"), Some(&Digest::of(b"y"))).is_err());
    let mut b = bytes.clone();
    b[0] = b'X';
    assert!(Manifest::from_bytes(&b, Path::new("t"), None).is_err());
    for cut in 0..bytes.len() {
        let _ = Manifest::from_bytes(&bytes[..cut], Path::new("t"), None);
    }
    for i in 8..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0xff;
        if let Ok(m) = Manifest::from_bytes(&b, Path::new("t"), None) {
            // Whatever validated must be self-consistent.
            assert_eq!(m.chunk_count(), chunk_count(m.size_bytes(), m.chunk_bytes()));
            assert_eq!(m.format(), 3);
            assert!(m.leaves().is_some());
        }
    }
}

#[test]
fn leaves_must_match_size() {
    let mut short = record();
    short.leaves.as_mut().unwrap().digests.pop();
    assert!(Manifest::from_bytes(&short.encode(), Path::new("t"), None).is_err());
    let mut odd = record();
    odd.leaves.as_mut().unwrap().leaf_bytes = 8192;
    assert!(Manifest::from_bytes(&odd.encode(), Path::new("t"), None).is_err());
}

#[test]
fn issue15_format_3_needs_leaves_and_names_an_unbound_chunk() {
    let mut none = record();
    none.leaves = None;
    let err = Manifest::from_bytes(&none.encode(), Path::new("t"), None).unwrap_err();
    assert!(err.to_string().contains("format 3 without leaf digests"), "{err}");
    // A format-3 record whose chunk digest is not its leaves' root opens
    // (the check costs hashing) but fails `check_tree`, naming the chunk.
    let mut lying = record();
    lying.chunk_digests[2] = [7u8; 32];
    let m = Manifest::from_bytes(&lying.encode(), Path::new("t"), None).unwrap();
    let err = m.check_tree().unwrap_err().to_string();
    assert!(err.contains("chunk 2's digest is not the Merkle root"), "{err}");
    // A format-2 header over a format-3 archive (or the reverse) is refused.
    let mut b = record().encode();
    b[..8].copy_from_slice(b"CNSEMF02");
    assert!(Manifest::from_bytes(&b, Path::new("t"), None).is_err());
}

#[test]
fn issue15_format_2_manifests_still_open_with_plain_chunk_digests() {
    let v2 = record_v2();
    let bytes = v2.encode();
    assert!(bytes.starts_with(b"CNSEMF02"));
    let m = Manifest::from_bytes(&bytes, Path::new("t"), None).unwrap();
    assert_eq!((m.format(), m.chunk_scheme()), (2, ChunkScheme::Plain));
    assert_eq!(m.chunk_digests(), &[[7u8; 32]; 4][..]);
    assert_eq!(m.leaves(), Some((4096, &[[9u8; 32]; 4][..])));
    m.check_tree().unwrap();
    assert_eq!(m.record(), v2);
    // Upgrading keeps everything but the definition of the chunk digests.
    let up = m.record().into_format3(4096, vec![[9u8; 32]; 4]);
    // `record()` stamps the current time: compare with v2's stamp.
    let mut want = record();
    want.created_unix_ms = v2.created_unix_ms;
    assert_eq!(up, want);
}

#[test]
fn issue15_format_1_manifests_still_open() {
    let new = record_v2();
    let old = ManifestRecordV1 {
        format_version: 1,
        digest: new.digest,
        size_bytes: new.size_bytes,
        name: new.name.clone(),
        created_unix_ms: new.created_unix_ms,
        chunk_bytes: new.chunk_bytes,
        chunk_digests: new.chunk_digests.clone(),
        gguf: new.gguf.clone(),
    };
    let bytes = old.encode();
    assert!(bytes.starts_with(b"CNSEMF01"));
    let m = Manifest::from_bytes(&bytes, Path::new("t"), Some(&Digest::of(b"x"))).unwrap();
    assert_eq!((m.format(), m.chunk_scheme()), (1, ChunkScheme::Plain));
    assert_eq!(m.chunk_digests(), &new.chunk_digests[..]);
    assert_eq!(m.leaves(), None);
    assert_eq!(
        m.record(),
        ManifestRecord {
            leaves: None,
            ..new.clone()
        }
    );
    let dir = std::env::temp_dir().join(format!("cnse-mf1-{}", std::process::id()));
    std::fs::write(&dir, &bytes).unwrap();
    let m = Manifest::open(&dir, None).unwrap();
    let _ = std::fs::remove_file(&dir);
    assert_eq!((m.size_bytes(), m.format()), (new.size_bytes, 1));
}

#[test]
fn chunk_count_must_match_size() {
    let mut rec = record();
    rec.chunk_digests.pop();
    assert!(Manifest::from_bytes(&rec.encode(), Path::new("t"), None).is_err());
}
