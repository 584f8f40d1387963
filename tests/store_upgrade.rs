//! Issue 15: `put` writes leaf digests; format-1 manifests (no leaves) still
//! load and verify on the host; `store upgrade` adds leaves after checking
//! every chunk, and refuses a corrupt blob.

mod store_support;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use store_support::*;

fn manifest_path(store: &Path, digest: &str) -> std::path::PathBuf {
    store
        .join("manifests/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// Rewrites a blob's manifest in format 1, as older versions wrote it.
fn downgrade(store: &Path, digest: &str) {
    let p = manifest_path(store, digest);
    let m = cnse_store::Manifest::open(&p, None).unwrap();
    let r = m.record();
    let old = cnse_store::ManifestRecordV1 {
        format_version: 1,
        digest: r.digest,
        size_bytes: r.size_bytes,
        name: r.name,
        created_unix_ms: r.created_unix_ms,
        chunk_bytes: r.chunk_bytes,
        chunk_digests: r.chunk_digests,
        gguf: r.gguf,
    };
    make_writable(&p);
    std::fs::write(&p, old.encode()).unwrap();
}

#[test]
fn issue15_put_writes_leaves_and_upgrade_adds_them_to_old_manifests() {
    let dir = Scratch::new("upgrade");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, (3 << 20) + 123, 5);
    let digest = put(&store, &file, &["--chunk-bytes", "1MiB", "--name", "m:1"]);
    let j = json(&store, &["inspect", "m:1"]);
    assert_eq!(j["leaf_bytes"], 64 << 10, "{j}");
    assert_eq!(j["leaf_count"], 49, "{j}");

    downgrade(&store, &digest);
    assert!(std::fs::read(manifest_path(&store, &digest))
        .unwrap()
        .starts_with(b"CNSEMF01"));
    let out = ok(&store, &["inspect", "m:1"]);
    assert!(out.contains("none (format 1 manifest"), "{out}");
    ok(&store, &["verify", "m:1"]);

    let out = ok(&store, &["upgrade", "m:1", "--leaf-bytes", "256K"]);
    assert!(out.contains("upgraded (leaves of 262144 bytes)"), "{out}");
    assert!(std::fs::read(manifest_path(&store, &digest))
        .unwrap()
        .starts_with(b"CNSEMF02"));
    let j = json(&store, &["inspect", "m:1"]);
    assert_eq!(j["leaf_bytes"], 256 << 10, "{j}");
    assert_eq!(j["leaf_count"], 13, "{j}");
    let out = ok(&store, &["upgrade", "--all", "--leaf-bytes", "256K"]);
    assert!(out.contains("already current"), "{out}");
    ok(&store, &["verify", "m:1"]);

    // The leaves match the bytes: the store's own leaf check agrees.
    let m = cnse_store::Manifest::open(&manifest_path(&store, &digest), None).unwrap();
    let (leaf, sums) = m.leaves().unwrap();
    let data = std::fs::read(&file).unwrap();
    assert!(cnse_store::bad_leaves(&data, data.len() as u64, leaf, sums).is_empty());

    let (_, err) = fails(&store, &["upgrade", "m:1", "--leaf-bytes", "3000"]);
    assert!(err.contains("--leaf-bytes") && err.lines().count() == 1, "{err}");
}

#[test]
fn issue15_upgrade_refuses_a_corrupt_blob_and_keeps_its_manifest() {
    let dir = Scratch::new("upgrade-bad");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, (2 << 20) + 9, 6);
    let digest = put(&store, &file, &["--chunk-bytes", "1MiB"]);
    downgrade(&store, &digest);
    let before = std::fs::read(manifest_path(&store, &digest)).unwrap();
    let blob = blob_path(&store, &digest);
    make_writable(&blob);
    let f = OpenOptions::new().read(true).write(true).open(&blob).unwrap();
    f.write_all_at(&[0xAB], (1 << 20) + 17).unwrap();
    drop(f);
    let (_, err) = fails(&store, &["upgrade", &digest]);
    assert!(err.contains("first chunk 1; manifest not upgraded"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert_eq!(std::fs::read(manifest_path(&store, &digest)).unwrap(), before);
}
