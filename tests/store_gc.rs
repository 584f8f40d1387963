//! Issue 3: the LRU byte budget. `gc` evicts least recently used blobs,
//! unreferenced ones first, and never a blob a pinned name holds; leftovers
//! of killed writers go; `rm` removes names and blobs as asked.

mod store_support;
use store_support::*;

const MIB: usize = 1 << 20;

fn digests(store: &std::path::Path) -> Vec<String> {
    let v = json(store, &["ls"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn gc_evicts_lru_unreferenced_first_and_never_pinned_issue_3() {
    let dir = Scratch::new("gc");
    let store = dir.path("store");
    let mut d = Vec::new();
    for (i, extra) in [&["--name", "keep:v1", "--pin"][..], &["--name", "named:v1"], &[], &[]]
        .iter()
        .enumerate()
    {
        let f = dir.path(&format!("f{i}"));
        write_noise(&f, MIB, i as u64 + 100);
        d.push(put(&store, &f, extra));
    }
    let (pinned, named, old, recent) = (&d[0], &d[1], &d[2], &d[3]);
    // Use order, oldest first: pinned, named, old, recent.
    for x in [pinned, named, old, recent] {
        std::thread::sleep(std::time::Duration::from_millis(20));
        ok(&store, &["verify", x]);
    }

    // Room for three blobs: the least recently used unreferenced one goes.
    let r = json(&store, &["gc", "--max-bytes", &(3 * MIB + MIB / 2).to_string()]);
    assert_eq!(r["evicted"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["evicted"][0]["digest"].as_str().unwrap(), old);
    assert!(r["bytes_after"].as_u64().unwrap() <= (3 * MIB + MIB / 2) as u64);
    assert!(!digests(&store).contains(old));

    // Room for one: the other unreferenced, then the unpinned name, go.
    let r = json(&store, &["gc", "--max-bytes", &(MIB + MIB / 2).to_string()]);
    let gone: Vec<&str> = r["evicted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["digest"].as_str().unwrap())
        .collect();
    assert_eq!(gone, vec![recent.as_str(), named.as_str()]);
    assert_eq!(r["evicted"][1]["refs"], serde_json::json!(["named:v1"]));
    fails(&store, &["inspect", "named:v1"]);

    // No room at all: the pinned blob stays, and gc says why.
    let out = ok(&store, &["gc", "--max-bytes", "0"]);
    assert!(out.contains("pinned blobs hold"), "{out}");
    assert_eq!(digests(&store), vec![pinned.clone()]);
    ok(&store, &["verify", "keep:v1"]);

    // Unpinned, it goes.
    ok(&store, &["unpin", "keep:v1"]);
    ok(&store, &["gc", "--max-bytes", "0"]);
    assert!(digests(&store).is_empty());
}

#[test]
fn gc_removes_leftovers_of_killed_writers_but_keeps_resumable_pulls() {
    let dir = Scratch::new("gc-tmp");
    let store = dir.path("store");
    let f = dir.path("f");
    write_noise(&f, 1000, 1);
    put(&store, &f, &[]);
    std::fs::write(store.join("tmp/put-1-2-3"), b"half a blob").unwrap();
    std::fs::write(store.join("tmp/pull-abc.partial"), b"resumable").unwrap();
    std::fs::write(store.join("manifests/sha256").join("ab".repeat(32)), b"orphan").unwrap();
    let r = json(&store, &["gc"]);
    assert_eq!(r["temp_files_removed"], 1);
    assert_eq!(r["orphan_manifests_removed"], 1);
    assert_eq!(r["partial_bytes_kept"], 9);
    assert!(store.join("tmp/pull-abc.partial").exists());
    ok(&store, &["gc", "--partials"]);
    assert!(!store.join("tmp/pull-abc.partial").exists());
    ok(&store, &["verify", "--all"]);
}

#[test]
fn rm_removes_names_and_blobs_as_asked() {
    let dir = Scratch::new("rm");
    let store = dir.path("store");
    let f = dir.path("f");
    write_noise(&f, 5000, 2);
    let d = put(&store, &f, &["--name", "a:1"]);
    ok(&store, &["tag", &d, "b:1"]);
    // A referenced blob is not removed by digest without --force.
    let (_, e) = fails(&store, &["rm", &d]);
    assert!(e.contains("a:1") && e.contains("--force"), "{e}");
    // Removing one of two names keeps the blob.
    ok(&store, &["rm", "a:1"]);
    assert_eq!(digests(&store), vec![d.clone()]);
    // Removing the last name removes the blob.
    let r = json(&store, &["rm", "b:1"]);
    assert_eq!(r["blob_removed"].as_str(), Some(d.as_str()));
    assert!(digests(&store).is_empty());
    let d = put(&store, &f, &["--name", "c:1"]);
    ok(&store, &["rm", "--force", &d]);
    assert!(digests(&store).is_empty());
    fails(&store, &["inspect", "c:1"]);
}
