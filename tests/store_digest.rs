//! Issue 3: the store's digest is `sha256sum`'s, at every size that stresses
//! the chunking (0, 1, chunk size ± 1, many chunks), and what goes in comes
//! back out byte for byte.

mod store_support;
use store_support::*;

fn check_sizes(sizes: &[usize], chunk_bytes: Option<u64>) {
    let dir = Scratch::new("digest");
    let store = dir.path("store");
    let chunk_arg = chunk_bytes.map(|c| c.to_string());
    for (i, &size) in sizes.iter().enumerate() {
        let file = dir.path(&format!("in-{size}"));
        write_noise(&file, size, i as u64 + 1);
        let mut extra = vec![];
        if let Some(c) = &chunk_arg {
            extra = vec!["--chunk-bytes", c.as_str()];
        }
        let digest = put(&store, &file, &extra);
        assert_eq!(digest, sha256sum(&file), "size {size}");

        let info = json(&store, &["inspect", &digest]);
        let chunk = info["chunk_bytes"].as_u64().unwrap();
        assert_eq!(chunk, chunk_bytes.unwrap_or(16 << 20));
        assert_eq!(info["size_bytes"].as_u64().unwrap(), size as u64);
        assert_eq!(
            info["chunk_count"].as_u64().unwrap(),
            (size as u64).div_ceil(chunk),
            "size {size}"
        );

        let out = dir.path(&format!("out-{size}"));
        ok(&store, &["get", &digest, "-o", out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(&file).unwrap(),
            "get of size {size} differs"
        );
    }
    let v = json(&store, &["verify", "--all", "--full"]);
    assert_eq!(v["ok"], true);
    assert_eq!(v["checked"].as_u64().unwrap(), sizes.len() as u64);
}

#[test]
fn digest_equals_sha256sum_at_default_chunk_boundaries_issue_3() {
    const CHUNK: usize = 16 << 20;
    check_sizes(&[0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 12_345], None);
}

#[test]
fn digest_equals_sha256sum_with_small_chunks_issue_3() {
    check_sizes(&[4095, 4096, 4097, 7 * 4096 + 3], Some(4096));
}

#[test]
fn put_twice_stores_once_and_names_both() {
    let dir = Scratch::new("dedup");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, 100_000, 9);
    let a = json(&store, &["put", file.to_str().unwrap(), "--name", "m:one"]);
    let b = json(&store, &["put", file.to_str().unwrap(), "--name", "m:two"]);
    assert_eq!(a["digest"], b["digest"]);
    assert_eq!(
        (a["existed"].as_bool(), b["existed"].as_bool()),
        (Some(false), Some(true))
    );
    let ls = json(&store, &["ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["refs"].as_array().unwrap().len(), 2);
    assert_eq!(ok(&store, &["inspect", "m:two"]), ok(&store, &["inspect", "m:one"]));
}

#[test]
fn bad_chunk_sizes_and_missing_files_are_one_line_errors() {
    let dir = Scratch::new("badput");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, 10, 1);
    for c in ["1000", "0", "3GiB", "4097"] {
        fails(&store, &["put", file.to_str().unwrap(), "--chunk-bytes", c]);
    }
    let (_, e) = fails(&store, &["put", dir.path("missing").to_str().unwrap()]);
    assert!(e.contains("missing"), "{e}");
    let (_, e) = fails(&store, &["put", dir.0.to_str().unwrap()]);
    assert!(e.contains("not a regular file"), "{e}");
}
