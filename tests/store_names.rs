//! Issue 3: names that could escape the store (`/`, `..`, NUL, options) are
//! refused with one line, and nothing is written. (NUL cannot pass through
//! argv; the crate's unit test `rejects_slash_dotdot_nul_and_friends_issue_3`
//! covers it in the parser every command goes through.)

mod store_support;
use store_support::*;

#[test]
fn hostile_names_are_rejected_issue_3() {
    let dir = Scratch::new("names");
    let store = dir.path("store");
    let file = dir.path("f");
    write_noise(&file, 1000, 1);
    let digest = put(&store, &file, &[]);
    for bad in [
        "a/b:c",
        "a:b/c",
        "../../escape:x",
        "x:..",
        "..:t",
        "/etc/passwd:x",
        ".hidden:t",
        "a:b:c",
        "sp ace:t",
    ] {
        let (_, err) = fails(&store, &["put", file.to_str().unwrap(), "--name", bad]);
        assert!(err.contains("invalid reference"), "{bad}: {err}");
        let (_, err) = fails(&store, &["tag", &digest, bad]);
        assert!(err.contains("invalid reference"), "{bad}: {err}");
        fails(&store, &["get", bad, "-o", dir.path("o").to_str().unwrap()]);
        fails(&store, &["rm", bad]);
    }
    assert_eq!(
        std::fs::read_dir(store.join("refs")).unwrap().count(),
        0,
        "a ref was created"
    );
    assert!(!dir.0.join("escape").exists() && !store.join("escape").exists());
    // The store is untouched and still fine.
    ok(&store, &["verify", "--all"]);
}

#[test]
fn unknown_targets_are_one_line_errors() {
    let dir = Scratch::new("unknown");
    let store = dir.path("store");
    let out = dir.path("o");
    let o = out.to_str().unwrap();
    let (_, e) = fails(&store, &["get", "nosuch:tag", "-o", o]);
    assert!(e.contains("reference nosuch:tag not found"), "{e}");
    let (_, e) = fails(&store, &["get", &format!("sha256:{}", "0".repeat(64)), "-o", o]);
    assert!(e.contains("not found"), "{e}");
    let (_, e) = fails(&store, &["inspect", "sha256:1234"]);
    assert!(e.contains("invalid digest"), "{e}");
    fails(&store, &["verify"]);
    fails(&store, &["pin", "nosuch:tag"]);
    fails(&store, &["pull", "m:t", "--filer", "https://example.invalid/"]);
    fails(&store, &["pull", "m:t", "--filer", "http://127.0.0.1:1/"]);
}
