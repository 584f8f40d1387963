//! Issue 3: push and pull over HTTP against a real server (nginx with
//! WebDAV PUT and Range GET, standing in for a SeaweedFS filer): round trip,
//! an interrupted pull resumed, a chunk corrupted in transit fetched again
//! alone, and a chunk corrupted on the server detected; issue 15: a pull
//! stores format 3 whether the filer holds a format-3 or a format-2 manifest.

mod store_support;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use store_support::*;

const MIB: u64 = 1 << 20;

fn pushed(dir: &Scratch, filer: &FilerServer, bytes: u64, name: &str) -> (std::path::PathBuf, String) {
    let src_store = dir.path("src-store");
    let file = dir.path("model.bin");
    write_noise(&file, bytes as usize, bytes);
    let digest = put(&src_store, &file, &["--chunk-bytes", "1MiB", "--name", name]);
    let r = json(&src_store, &["push", name, "--filer", &filer.url]);
    assert_eq!(r["blob_existed"], false);
    assert!(r["uploaded_bytes"].as_u64().unwrap() > bytes);
    (file, digest)
}

#[test]
fn push_pull_round_trip_by_name_and_digest() {
    let Some(filer) = FilerServer::start("push_pull_round_trip_by_name_and_digest") else {
        return;
    };
    let dir = Scratch::new("roundtrip");
    let (file, digest) = pushed(&dir, &filer, 3 * MIB + 5, "m:v1");
    // A second push finds the blob on the filer and does not upload it again.
    let again = json(&dir.path("src-store"), &["push", &digest, "--filer", &filer.url]);
    assert_eq!(again["blob_existed"], true);

    let b = dir.path("b");
    let r = json(&b, &["pull", "m:v1", "--filer", &filer.url]);
    assert_eq!(r["digest"].as_str(), Some(digest.as_str()));
    assert_eq!(r["downloaded_bytes"], 3 * MIB + 5);
    assert_eq!(json(&b, &["inspect", "m:v1"])["digest"].as_str(), Some(digest.as_str()));
    ok(&b, &["verify", "--full", "--all"]);
    let out = dir.path("out");
    ok(&b, &["get", "m:v1", "-o", out.to_str().unwrap()]);
    assert_eq!(sha256sum(&out), sha256sum(&file));
    // Pulling what is there already transfers nothing.
    assert_eq!(json(&b, &["pull", "m:v1", "--filer", &filer.url])["existed"], true);

    let c = dir.path("c");
    ok(&c, &["pull", &digest, "--filer", &filer.url]);
    ok(&c, &["verify", "--full", &digest]);
    let (_, e) = fails(&c, &["pull", "absent:v1", "--filer", &filer.url]);
    assert!(e.contains("reference absent:v1 not found on filer"), "{e}");
}

fn state_done_chunks(state: &Path) -> usize {
    std::fs::read(state)
        .map(|b| b.iter().skip(24).filter(|&&x| x == 1).count())
        .unwrap_or(0)
}

#[test]
fn pull_interrupted_and_resumed_issue_3() {
    let Some(filer) = FilerServer::start("pull_interrupted_and_resumed_issue_3") else {
        return;
    };
    let dir = Scratch::new("resume");
    let size = 48 * MIB;
    let (file, digest) = pushed(&dir, &filer, size, "big:v1");
    let b = dir.path("b");
    let state = b
        .join("tmp")
        .join(format!("pull-{}.state", digest.trim_start_matches("sha256:")));

    // A slow pull, killed once some chunks are safely down.
    let mut child = Command::new(BIN)
        .args([
            "store",
            "--store",
            b.to_str().unwrap(),
            "pull",
            "big:v1",
            "--filer",
            &filer.url,
        ])
        .args(["--limit-rate", "16MiB"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while state_done_chunks(&state) < 8 && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let done_before = state_done_chunks(&state);
    assert!((8..48).contains(&done_before), "{done_before} chunks done at the kill");
    assert!(
        !blob_path(&b, &digest).exists(),
        "a blob appeared from an interrupted pull"
    );
    ok(&b, &["verify", "--all"]);

    let r = json(&b, &["pull", "big:v1", "--filer", &filer.url]);
    let resumed = r["resumed_bytes"].as_u64().unwrap();
    let downloaded = r["downloaded_bytes"].as_u64().unwrap();
    assert!(
        resumed >= done_before as u64 * MIB,
        "resumed {resumed}, {done_before} chunks were done"
    );
    assert_eq!(
        resumed + downloaded,
        size,
        "the resumed pull fetched what it already had"
    );
    assert_eq!(r["refetched_chunks"], serde_json::json!([]));
    ok(&b, &["verify", "--full", "big:v1"]);
    assert_eq!(sha256sum(&blob_path(&b, &digest)), sha256sum(&file));
    assert!(!state.exists(), "pull state left behind");
}

/// A one-request-per-connection HTTP proxy that logs each request's target
/// and Range, and injects one fault into the first blob response it fits:
/// a flipped byte at a blob offset, or the connection cut after some body
/// bytes (faults of a network or a disk that do not repeat).
struct Proxy {
    url: String,
    log: Arc<Mutex<Vec<String>>>,
}

#[derive(Clone, Copy)]
enum Fault {
    FlipAt(u64),
    CutAfter(usize),
}

fn proxy(upstream: String, base_path: String, fault: Fault) -> Proxy {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}{base_path}", l.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let fault = Arc::new(Mutex::new(Some(fault)));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if c.read(&mut byte).unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(&head).into_owned();
            let line = text.lines().next().unwrap_or("").to_string();
            let range = text
                .lines()
                .find_map(|l| l.strip_prefix("Range: bytes="))
                .map(|r| r.trim().to_string())
                .unwrap_or_default();
            log2.lock().unwrap().push(format!("{line} {range}"));
            let mut up = TcpStream::connect(&upstream).unwrap();
            up.write_all(&head).unwrap();
            let mut resp = Vec::new();
            up.read_to_end(&mut resp).unwrap();
            if line.starts_with("GET ") && line.contains("/blobs/") {
                let start: u64 = range.split('-').next().and_then(|s| s.parse().ok()).unwrap_or(0);
                let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let mut f = fault.lock().unwrap();
                match *f {
                    Some(Fault::FlipAt(off)) => {
                        let len = (resp.len() - body_at) as u64;
                        if off >= start && off < start + len {
                            resp[body_at + (off - start) as usize] ^= 0x01;
                            *f = None;
                        }
                    }
                    Some(Fault::CutAfter(n)) => {
                        resp.truncate(body_at + n);
                        *f = None;
                    }
                    None => {}
                }
            }
            let _ = c.write_all(&resp);
        }
    });
    Proxy { url, log }
}

#[test]
fn chunk_corrupted_in_transit_is_fetched_again_alone_issue_3() {
    let Some(filer) = FilerServer::start("chunk_corrupted_in_transit_is_fetched_again_alone_issue_3") else {
        return;
    };
    let dir = Scratch::new("transit");
    let size = 8 * MIB + 3;
    let (_file, digest) = pushed(&dir, &filer, size, "t:v1");
    let p = proxy(filer.authority(), filer.base_path(), Fault::FlipAt(5 * MIB + 77));
    let b = dir.path("b");
    let r = json(&b, &["pull", "t:v1", "--filer", &p.url]);
    assert_eq!(r["refetched_chunks"], serde_json::json!([5]));
    assert_eq!(
        r["downloaded_bytes"],
        size + MIB,
        "more than the one bad chunk was fetched again"
    );
    let blob_gets: Vec<String> = p
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("/blobs/"))
        .cloned()
        .collect();
    assert_eq!(blob_gets.len(), 2, "{blob_gets:?}");
    assert!(blob_gets[0].ends_with(&format!(" 0-{}", size - 1)), "{blob_gets:?}");
    assert!(
        blob_gets[1].ends_with(&format!(" {}-{}", 5 * MIB, 6 * MIB - 1)),
        "{blob_gets:?}"
    );
    ok(&b, &["verify", "--full", &digest]);
}

#[test]
fn chunk_corrupted_on_the_remote_is_detected_issue_3() {
    let Some(filer) = FilerServer::start("chunk_corrupted_on_the_remote_is_detected_issue_3") else {
        return;
    };
    let dir = Scratch::new("remote-bad");
    let size = 6 * MIB + 1000;
    let (file, digest) = pushed(&dir, &filer, size, "r:v1");
    let good = std::fs::read(&file).unwrap();
    let mut bad = good.clone();
    bad[(3 * MIB + 10) as usize] ^= 0x40;
    let blob_target = format!(
        "{}/blobs/sha256/{}",
        filer.base_path(),
        digest.trim_start_matches("sha256:")
    );
    let (status, _) = http(&filer.authority(), "PUT", &blob_target, &bad);
    assert!((200..300).contains(&status), "{status}");

    let b = dir.path("b");
    let (_, e) = fails(&b, &["pull", "r:v1", "--filer", &filer.url]);
    assert!(e.contains("chunk 3 (bytes 3145728..4194304) fails its digest"), "{e}");
    assert!(!blob_path(&b, &digest).exists(), "a corrupt blob entered the store");
    ok(&b, &["verify", "--all"]);

    // Once the filer is repaired, the pull fetches only the missing chunk.
    let (status, _) = http(&filer.authority(), "PUT", &blob_target, &good);
    assert!((200..300).contains(&status), "{status}");
    let r = json(&b, &["pull", "r:v1", "--filer", &filer.url]);
    assert_eq!(r["downloaded_bytes"], MIB);
    assert_eq!(r["resumed_bytes"], size - MIB);
    ok(&b, &["verify", "--full", &digest]);
}

#[test]
fn pull_survives_a_dropped_connection() {
    let Some(filer) = FilerServer::start("pull_survives_a_dropped_connection") else {
        return;
    };
    let dir = Scratch::new("cut");
    let size = 8 * MIB + 3;
    let (_file, digest) = pushed(&dir, &filer, size, "c:v1");
    let cut = (3 * MIB + MIB / 2) as usize;
    let p = proxy(filer.authority(), filer.base_path(), Fault::CutAfter(cut));
    let b = dir.path("b");
    let r = json(&b, &["pull", "c:v1", "--filer", &p.url]);
    // The half chunk in flight is lost; nothing before it is fetched again.
    assert_eq!(r["downloaded_bytes"], cut as u64 + (size - 3 * MIB));
    let blob_gets: Vec<String> = p
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("/blobs/"))
        .cloned()
        .collect();
    assert_eq!(blob_gets.len(), 2, "{blob_gets:?}");
    assert!(
        blob_gets[1].ends_with(&format!(" {}-{}", 3 * MIB, size - 1)),
        "{blob_gets:?}"
    );
    ok(&b, &["verify", "--full", &digest]);
}

#[test]
fn issue15_pulls_store_format_3_whatever_format_the_filer_holds() {
    let Some(filer) = FilerServer::start("issue15_pulls_store_format_3_whatever_format_the_filer_holds") else {
        return;
    };
    let dir = Scratch::new("formats");
    let (file, digest) = pushed(&dir, &filer, 2 * MIB + 7, "f:v1");
    let hex = digest.trim_start_matches("sha256:").to_string();
    let manifest_of = |store: &Path| std::fs::read(store.join("manifests/sha256").join(&hex)).unwrap();
    let format3 = manifest_of(&dir.path("src-store"));
    assert!(format3.starts_with(b"CNSEMF03"));
    // Format 3 on the filer: every chunk checked by its Merkle root, and the
    // manifest stored as pushed.
    let b = dir.path("b");
    ok(&b, &["pull", "f:v1", "--filer", &filer.url]);
    assert_eq!(manifest_of(&b), format3);
    // Format 2 on the filer, as an older cnse-dp pushed it (plain chunk
    // digests, no leaves): chunks are checked by plain SHA-256, and the
    // pull stores the same format-3 manifest `put` wrote.
    let m = cnse_store::Manifest::from_bytes(&format3, Path::new("m"), None).unwrap();
    let data = std::fs::read(&file).unwrap();
    let old = cnse_store::ManifestRecord {
        format_version: 2,
        chunk_digests: cnse_store::chunk_digests_parallel(&data, MIB, cnse_store::ChunkScheme::Plain, 2),
        leaves: None,
        ..m.record()
    };
    let target = format!("{}/manifests/sha256/{hex}", filer.base_path());
    let (status, _) = http(&filer.authority(), "PUT", &target, &old.encode());
    assert!((200..300).contains(&status), "PUT manifest: {status}");
    let c = dir.path("c");
    ok(&c, &["pull", &digest, "--filer", &filer.url]);
    assert_eq!(manifest_of(&c), format3);
    ok(&c, &["verify", "--full", &digest]);
    // Pushing the format-3 store again puts format 3 back on the filer.
    ok(&c, &["push", &digest, "--filer", &filer.url]);
    let d = dir.path("d");
    ok(&d, &["pull", &digest, "--filer", &filer.url]);
    assert_eq!(manifest_of(&d), format3);
}
