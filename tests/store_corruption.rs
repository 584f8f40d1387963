//! Issue 3: damaged blobs are caught by `verify`, which names the chunk, and
//! `get` refuses to hand them out.

mod store_support;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use store_support::*;

const CHUNK: u64 = 1 << 20;

fn setup(label: &str) -> (Scratch, std::path::PathBuf, String) {
    let dir = Scratch::new(label);
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, (5 * CHUNK + 7) as usize, 3);
    let digest = put(&store, &file, &["--chunk-bytes", "1MiB"]);
    ok(&store, &["verify", &digest]);
    (dir, store, digest)
}

#[test]
fn bit_flip_fails_verify_and_names_the_chunk_issue_3() {
    let (dir, store, digest) = setup("flip");
    let blob = blob_path(&store, &digest);
    make_writable(&blob);
    let f = OpenOptions::new().read(true).write(true).open(&blob).unwrap();
    let at = 2 * CHUNK + 4321;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    drop(f);

    let (out, err) = fails(&store, &["verify", &digest]);
    assert!(
        out.contains("chunk 2 (bytes 2097152..3145728)"),
        "verify output does not name chunk 2: {out}"
    );
    assert!(err.contains("1 of 1 blobs failed"), "{err}");
    let o = store_cmd(&store, &["--json", "verify", "--all"]);
    assert!(!o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["blobs"][0]["bad_chunks"], serde_json::json!([2]));

    let out_file = dir.path("out");
    let (_, err) = fails(&store, &["get", &digest, "-o", out_file.to_str().unwrap()]);
    assert!(err.contains("chunk 2"), "{err}");
    assert!(!out_file.exists(), "get wrote a corrupt file");
    let (piped, _) = fails(&store, &["get", &digest, "-o", "-"]);
    assert!(piped.is_empty(), "get -o - wrote corrupt bytes");
}

#[test]
fn truncated_blob_fails_verify_issue_3() {
    let (_dir, store, digest) = setup("trunc");
    let blob = blob_path(&store, &digest);
    make_writable(&blob);
    OpenOptions::new()
        .write(true)
        .open(&blob)
        .unwrap()
        .set_len(2 * CHUNK + CHUNK / 2)
        .unwrap();
    let (out, _) = fails(&store, &["verify", &digest]);
    assert!(out.contains("truncated: 2621440 of 5242887 bytes"), "{out}");
    for c in 2..=5 {
        assert!(out.contains(&format!("chunk {c} ")), "chunk {c} not named: {out}");
    }
    assert!(!out.contains("chunk 1 "), "intact chunk 1 named: {out}");
}

#[test]
fn appended_bytes_and_damaged_manifest_fail_verify() {
    let (_dir, store, digest) = setup("append");
    let blob = blob_path(&store, &digest);
    make_writable(&blob);
    let f = OpenOptions::new().append(true).open(&blob).unwrap();
    f.write_all_at(b"tail", 0).unwrap();
    drop(f);
    let (out, _) = fails(&store, &["verify", &digest]);
    assert!(out.contains("4 bytes longer"), "{out}");

    let (_dir2, store2, digest2) = setup("manifest");
    let man = store2
        .join("manifests/sha256")
        .join(digest2.trim_start_matches("sha256:"));
    make_writable(&man);
    let mut bytes = std::fs::read(&man).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0xff;
    bytes.truncate(n - 3);
    std::fs::write(&man, &bytes).unwrap();
    let (out, _) = fails(&store2, &["verify", "--all"]);
    assert!(out.contains("manifest"), "{out}");
}

#[test]
fn full_verify_checks_the_whole_file_digest() {
    let (_dir, store, digest) = setup("full");
    let v = json(&store, &["verify", "--full", &digest]);
    assert_eq!(v["blobs"][0]["full_ok"], true);
}
