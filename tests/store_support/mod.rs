//! Shared helpers of the `store_*` integration tests: they run the real
//! `cnse-dp` binary on scratch directories and, where needed, a real HTTP
//! file server (Debian's nginx with WebDAV, via scripts/nginx-webdav.sh).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

pub const BIN: &str = env!("CARGO_BIN_EXE_cnse-dp");

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(label: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "cnse-store-test-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Blobs are read-only files; removal needs only the directory's write bit.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cnse-dp store --store STORE ARGS...`.
pub fn store_cmd(store: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("store")
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("run cnse-dp")
}

/// Runs and requires success; returns stdout.
pub fn ok(store: &Path, args: &[&str]) -> String {
    let o = store_cmd(store, args);
    assert!(
        o.status.success(),
        "cnse-dp store {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs and requires a failure reported the way a user should see it: a
/// non-zero exit and exactly one line on stderr, no panic. Returns (stdout, stderr).
pub fn fails(store: &Path, args: &[&str]) -> (String, String) {
    let o = store_cmd(store, args);
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "cnse-dp store {args:?} succeeded; stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(o.status.code(), Some(1), "{args:?}: not a clean error exit: {stderr}");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{args:?}: want one error line, got: {stderr}"
    );
    (String::from_utf8_lossy(&o.stdout).into_owned(), stderr)
}

pub fn json(store: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(ok(store, &a).trim()).expect("one JSON object")
}

/// The digest `put` prints on its last stdout line.
pub fn put(store: &Path, file: &Path, extra: &[&str]) -> String {
    let mut a = vec!["put", file.to_str().unwrap()];
    a.extend_from_slice(extra);
    let out = ok(store, &a);
    let last = out.trim_end().lines().last().unwrap_or("").to_string();
    assert!(
        last.starts_with("sha256:") && last.len() == 71,
        "last line is not a digest: {out:?}"
    );
    last
}

#[path = "../noise/mod.rs"]
mod bytes;
pub use bytes::noise;

pub fn write_noise(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, noise(len, seed)).unwrap();
}

/// `sha256:` + what `sha256sum` prints for `path`.
pub fn sha256sum(path: &Path) -> String {
    let o = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum is installed (coreutils)");
    assert!(o.status.success());
    format!(
        "sha256:{}",
        String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap()
    )
}

pub fn blob_path(store: &Path, digest: &str) -> PathBuf {
    store.join("blobs/sha256").join(digest.trim_start_matches("sha256:"))
}

/// Makes a read-only blob writable so a test can damage it.
pub fn make_writable(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
}

pub fn services_required() -> bool {
    std::env::var("CNSE_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// Says why a test does not run, loudly; a failure when services are required.
pub fn skip(test: &str, why: &str) {
    if services_required() {
        panic!("{test}: required service missing (CNSE_REQUIRE_SERVICES=1): {why}");
    }
    eprintln!("skipped: {test}: {why}");
    println!("skipped: {test}: {why}");
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An HTTP filer for a test: `CNSE_FILER_URL` when set, else a private nginx
/// started through scripts/nginx-webdav.sh and stopped on drop.
pub struct FilerServer {
    pub url: String,
    /// The directory nginx serves, when this test started it.
    pub root: Option<Scratch>,
}

impl FilerServer {
    pub fn start(test: &str) -> Option<FilerServer> {
        if let Ok(url) = std::env::var("CNSE_FILER_URL") {
            // Each test works under its own prefix of a shared server.
            static N: AtomicU64 = AtomicU64::new(0);
            let prefix = format!("cnse-test-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
            return Some(FilerServer {
                url: format!("{}/{prefix}", url.trim_end_matches('/')),
                root: None,
            });
        }
        let root = Scratch::new("filer");
        let script = repo_root().join("scripts/nginx-webdav.sh");
        let o = Command::new("bash").arg(&script).arg("start").arg(&root.0).output();
        match o {
            Ok(o) if o.status.success() => {
                let url = String::from_utf8_lossy(&o.stdout).trim().to_string();
                Some(FilerServer {
                    url: format!("{url}/models"),
                    root: Some(root),
                })
            }
            Ok(o) => {
                skip(
                    test,
                    &format!("could not start nginx: {}", String::from_utf8_lossy(&o.stderr).trim()),
                );
                None
            }
            Err(e) => {
                skip(test, &format!("could not run {}: {e}", script.display()));
                None
            }
        }
    }

    /// `host:port` of the server.
    pub fn authority(&self) -> String {
        let rest = self.url.strip_prefix("http://").unwrap();
        rest.split('/').next().unwrap().to_string()
    }

    /// Path prefix under which the store keeps its files (e.g. `/models`).
    pub fn base_path(&self) -> String {
        let rest = self.url.strip_prefix("http://").unwrap();
        rest.find('/').map(|i| rest[i..].to_string()).unwrap_or_default()
    }
}

impl Drop for FilerServer {
    fn drop(&mut self) {
        if let Some(root) = &self.root {
            let _ = Command::new("bash")
                .arg(repo_root().join("scripts/nginx-webdav.sh"))
                .arg("stop")
                .arg(&root.0)
                .output();
        }
    }
}

/// A raw HTTP/1.1 request; returns (status, body). For tests that play the
/// part of someone else writing to the filer.
pub fn http(authority: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(authority).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let head_end = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let status = String::from_utf8_lossy(&resp[9..12]).parse().unwrap();
    (status, resp[head_end..].to_vec())
}

/// The real SmolLM2 GGUF (scripts/fetch-model.sh), or a skip.
pub fn model(test: &str) -> Option<PathBuf> {
    let o = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-model.sh"))
        .output();
    match o {
        Ok(o) if o.status.success() => Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        Ok(o) => {
            skip(
                test,
                &format!("model not available: {}", String::from_utf8_lossy(&o.stderr).trim()),
            );
            None
        }
        Err(e) => {
            skip(test, &format!("cannot run scripts/fetch-model.sh: {e}"));
            None
        }
    }
}
