//! Issue 15: `put` writes format-3 manifests (leaf digests, chunk digests =
//! Merkle roots over them); format-1 (no leaves) and format-2 (plain chunk
//! digests) manifests still load and verify on the host; `store upgrade`
//! rewrites them in format 3 after checking every chunk, and refuses a
//! corrupt blob.

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

/// Rewrites a blob's manifest in format 1 or 2, as older versions wrote
/// it: chunk digests are the plain SHA-256 of each chunk.
fn downgrade_to(format: u32, store: &Path, digest: &str) {
    let p = manifest_path(store, digest);
    let m = cnse_store::Manifest::open(&p, None).unwrap();
    let r = m.record();
    let bytes = std::fs::read(blob_path(store, digest)).unwrap();
    let plain = cnse_store::chunk_digests_parallel(&bytes, r.chunk_bytes, cnse_store::ChunkScheme::Plain, 2);
    let file = if format == 1 {
        cnse_store::ManifestRecordV1 {
            format_version: 1,
            digest: r.digest,
            size_bytes: r.size_bytes,
            name: r.name,
            created_unix_ms: r.created_unix_ms,
            chunk_bytes: r.chunk_bytes,
            chunk_digests: plain,
            gguf: r.gguf,
        }
        .encode()
    } else {
        cnse_store::ManifestRecord {
            format_version: 2,
            chunk_digests: plain,
            ..r
        }
        .encode()
    };
    make_writable(&p);
    std::fs::write(&p, file).unwrap();
}

fn downgrade(store: &Path, digest: &str) {
    downgrade_to(1, store, digest)
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
    assert!(
        out.contains("upgraded (format 1 -> 3, leaves of 262144 bytes)"),
        "{out}"
    );
    assert!(std::fs::read(manifest_path(&store, &digest))
        .unwrap()
        .starts_with(b"CNSEMF03"));
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
    // ... and the chunk digests are the Merkle roots over them.
    assert_eq!(
        m.chunk_digests(),
        &cnse_store::merkle::chunk_roots(sums, (1 << 20) / leaf)[..]
    );
    m.check_tree().unwrap();

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

#[test]
fn issue15_format_2_manifests_verify_as_before_and_upgrade_to_format_3() {
    let dir = Scratch::new("upgrade-v2");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, (3 << 20) + 5, 7);
    let digest = put(&store, &file, &["--chunk-bytes", "1MiB", "--name", "m:2"]);
    let j = json(&store, &["inspect", "m:2"]);
    assert_eq!(j["format"], 3, "{j}");
    let format3 = std::fs::read(manifest_path(&store, &digest)).unwrap();
    downgrade_to(2, &store, &digest);
    let j = json(&store, &["inspect", "m:2"]);
    assert_eq!(
        (j["format"].as_u64(), j["leaf_count"].as_u64()),
        (Some(2), Some(49)),
        "{j}"
    );
    assert!(
        j["chunk_digest"].as_str().unwrap().starts_with("SHA-256 of the chunk"),
        "{j}"
    );
    // Host verification uses the plain digests, and still names a bad chunk.
    ok(&store, &["verify", "m:2", "--full"]);
    let out_file = dir.path("out");
    ok(&store, &["get", "m:2", "-o", out_file.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out_file).unwrap(), std::fs::read(&file).unwrap());
    let blob = blob_path(&store, &digest);
    make_writable(&blob);
    let f = OpenOptions::new().read(true).write(true).open(&blob).unwrap();
    let good = {
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, (2 << 20) + 3).unwrap();
        b[0]
    };
    f.write_all_at(&[good ^ 1], (2 << 20) + 3).unwrap();
    let (out, _) = fails(&store, &["verify", "m:2"]);
    assert!(out.contains("chunk 2 (bytes 2097152..3145728) does not match"), "{out}");
    f.write_all_at(&[good], (2 << 20) + 3).unwrap();
    drop(f);
    // Upgrade: format 3 again, byte for byte what put wrote (same leaves,
    // same roots, same name and creation time).
    let out = ok(&store, &["upgrade", "m:2"]);
    assert!(out.contains("upgraded (format 2 -> 3, leaves of 65536 bytes)"), "{out}");
    assert_eq!(std::fs::read(manifest_path(&store, &digest)).unwrap(), format3);
    ok(&store, &["verify", "m:2", "--full"]);
}

#[test]
fn issue15_verify_reports_leaves_that_do_not_hash_to_the_chunk_digests() {
    let dir = Scratch::new("unbound");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, (2 << 20) + 1, 8);
    let digest = put(&store, &file, &["--chunk-bytes", "1MiB"]);
    let p = manifest_path(&store, &digest);
    let mut rec = cnse_store::Manifest::open(&p, None).unwrap().record();
    rec.leaves.as_mut().unwrap().digests[20][0] ^= 1;
    make_writable(&p);
    std::fs::write(&p, rec.encode()).unwrap();
    // The bytes still match every chunk digest; the leaves of chunk 1 do not.
    let (out, _) = fails(&store, &["verify", &digest]);
    assert!(
        out.contains("chunk 1's digest is not the Merkle root of its leaf digests"),
        "{out}"
    );
}
