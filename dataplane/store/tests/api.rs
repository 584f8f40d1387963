//! The library surface the GPU path uses: open → resolve → manifest →
//! blob_path / open_blob → verify_chunks_parallel.

use std::path::PathBuf;

use cnse_store::{merkle, verify_chunks_parallel, ChunkScheme, Digest, PutOptions, SourceFile, Store, StoreError};

fn scratch(label: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("cnse-store-api-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn resolve_manifest_and_verify_as_the_gpu_path_does() {
    let dir = scratch("gpu");
    let store = Store::open(dir.join("store")).unwrap();
    let file = dir.join("model.bin");
    let bytes: Vec<u8> = (0..3 * 4096 + 100).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    // SAFETY: the test's own file, not truncated while mapped.
    let src = unsafe { SourceFile::open(&file) }.unwrap();
    let opts = PutOptions {
        name: Some("m:v1".parse().unwrap()),
        chunk_bytes: 4096,
        ..PutOptions::default()
    };
    let put = store.put(&src, &opts, &|_| {}).unwrap();
    assert_eq!(put.digest, Digest::of(&bytes));

    // Every accepted spelling resolves to the same digest.
    let d = put.digest;
    for s in [d.to_string(), d.hex(), d.hex().to_uppercase(), "m:v1".to_string()] {
        assert_eq!(store.resolve(&s).unwrap(), d, "{s}");
    }
    assert!(matches!(store.resolve("m:v2"), Err(StoreError::NotFound { .. })));
    assert!(matches!(store.resolve("a/b:c"), Err(StoreError::BadRef { .. })));
    assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);

    let m = store.manifest(&d).unwrap();
    assert_eq!(
        (m.size_bytes(), m.chunk_bytes(), m.chunk_digests().len()),
        (bytes.len() as u64, 4096, 4)
    );
    assert_eq!(std::fs::read(store.blob_path(&d)).unwrap(), bytes);

    let blob = store.open_blob(&d).unwrap();
    let bad = verify_chunks_parallel(
        blob.bytes(),
        m.size_bytes(),
        m.chunk_bytes(),
        m.chunk_scheme(),
        m.chunk_digests(),
        2,
        &|_| {},
    );
    assert!(bad.is_empty());
    let mut damaged = bytes.clone();
    damaged[4096 * 3 + 1] ^= 1;
    let bad = verify_chunks_parallel(
        &damaged,
        m.size_bytes(),
        m.chunk_bytes(),
        m.chunk_scheme(),
        m.chunk_digests(),
        2,
        &|_| {},
    );
    assert_eq!(bad, vec![3]);
    // Format 3: the chunk digests are the Merkle roots over the leaves.
    let (leaf_bytes, leaves) = m.leaves().unwrap();
    assert_eq!(m.format(), 3);
    assert_eq!(m.chunk_scheme(), ChunkScheme::Merkle { leaf_bytes });
    assert_eq!(m.chunk_digests(), &merkle::chunk_roots(leaves, 4096 / leaf_bytes)[..]);
    m.check_tree().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn default_dir_follows_xdg() {
    let d = Store::default_dir();
    assert!(d.ends_with("cnse-dp/store"), "{}", d.display());
}

#[test]
fn a_source_changed_during_put_is_refused() {
    let dir = scratch("changed");
    let store = Store::open(dir.join("store")).unwrap();
    let file = dir.join("f");
    std::fs::write(&file, vec![7u8; 10_000]).unwrap();
    // SAFETY: the file only grows while mapped.
    let src = unsafe { SourceFile::open(&file) }.unwrap();
    let mut f = std::fs::OpenOptions::new().append(true).open(&file).unwrap();
    std::io::Write::write_all(&mut f, b"more").unwrap();
    let err = store.put(&src, &PutOptions::default(), &|_| {}).unwrap_err();
    assert!(err.to_string().contains("changed while it was being put"), "{err}");
    assert!(store.blob_digests().unwrap().0.is_empty(), "a blob was stored");
    let _ = std::fs::remove_dir_all(&dir);
}
