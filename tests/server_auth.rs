//! Issue 11, key handling, against the real binary: a key file others can
//! read is refused in one line; the key never appears in anything the
//! server prints; an unauthenticated connection reaches no backend and
//! disturbs no other client's stream.

mod common;
use common::*;

use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::Command;

const KEY: &str = "k3y-Xq9-never-printed";

/// A key file with `mode`, removed on drop.
struct KeyFile(PathBuf);

impl KeyFile {
    fn new(mode: u32) -> KeyFile {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("cnse-auth-{}-{n}.key", std::process::id()));
        std::fs::write(&path, format!("{KEY}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        KeyFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn issue11_a_key_file_others_can_read_is_refused_in_one_line() {
    for mode in [0o644, 0o640, 0o604, 0o660] {
        let key = KeyFile::new(mode);
        for cmd in [
            &["serve", "--listen", "127.0.0.1:0", "--threads", "1"][..],
            &["client", "--addr", "127.0.0.1:9", "--prompt", "x"][..],
        ] {
            let out = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
                .args(cmd)
                .args(["--auth-key-file", key.path()])
                .output()
                .unwrap();
            assert!(!out.status.success(), "{cmd:?} with mode {mode:o} ran: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
            let want = format!(
                "permissions {mode:04o} for '{}' are too open: the key file must not be readable or writable by \
                 group or others (chmod 600)",
                key.path()
            );
            assert!(err.contains(&want), "{err}");
            assert!(
                !err.contains(KEY) && out.stdout.is_empty(),
                "the key is not printed: {out:?}"
            );
        }
    }
    // Owner-only modes start.
    for mode in [0o600, 0o400] {
        let key = KeyFile::new(mode);
        let s = Server::start(&["--auth-key-file", key.path()]);
        s.client_with(KEY.as_bytes());
    }
}

#[test]
fn issue11_the_key_is_never_printed() {
    let key = KeyFile::new(0o600);
    let s = Server::start(&["--auth-key-file", key.path(), "--stats-interval-ms", "20"]);
    // Wrong keys, the key with a byte more, a prefix of it; then the key.
    for token in ["wrong", &format!("{KEY}x"), &KEY[..5]] {
        let mut c = s.raw();
        c.send_hello(token.as_bytes()).unwrap();
        expect_violation(&mut c, 401);
    }
    let mut c = s.client_with(KEY.as_bytes());
    assert_eq!(c.generate(1, 0, &params(3), "hi", |_, _| {}).unwrap().tokens, 3);
    assert!(eventually(WAIT, || s.stat("requests") == Some(1)));
    let text = s.output().join("\n");
    assert!(!text.contains(KEY), "the key is in the server's output:\n{text}");
    // Nor any 8 bytes of it (a key printed in pieces, or as a debug string).
    for w in KEY.as_bytes().windows(8) {
        assert!(!text.contains(std::str::from_utf8(w).unwrap()), "{text}");
    }
}

/// The text of one request for `max_tokens`, every token of it.
fn text_of(c: &mut Client, max_tokens: u32) -> Vec<u8> {
    let mut text = Vec::new();
    let g = c
        .generate(1, 0, &params(max_tokens), "the same prompt", |t, _| {
            text.extend_from_slice(t)
        })
        .unwrap();
    assert_eq!(g.tokens, u64::from(max_tokens));
    text
}

#[test]
fn issue11_unauthenticated_connections_reach_no_backend_and_no_other_stream() {
    let key = KeyFile::new(0o600);
    let mut args = vec!["--auth-key-file", key.path(), "--stats-interval-ms", "20"];
    let slow = synthetic(1_000, 2_000);
    args.extend(strs(&slow));
    let s = Server::start(&args);

    // Every way in without the key: each gets one ERROR on stream 0 and the
    // close, and nothing it sent reaches a backend.
    let hostile = |s: &Server| {
        for (token, code) in [(Some(&b"wrong"[..]), 401), (Some(b""), 401), (None, 400)] {
            let mut c = s.raw();
            let mut bytes = Vec::new();
            if let Some(t) = token {
                cnse_proto::put_hello(&mut bytes, t);
            }
            // A REQUEST (and a PING, a CREDIT) right behind it, in the same write.
            cnse_proto::put_request(&mut bytes, 1, 0, &params(50), b"sneak");
            cnse_proto::put_credit(&mut bytes, 1, 100);
            cnse_proto::put_ping(&mut bytes, 0, 1, 2, b"p");
            c.write_raw(&bytes).unwrap();
            let frames = expect_violation(&mut c, code);
            assert_eq!(frames.len(), 1, "only the ERROR: {frames:?}");
        }
    };
    for _ in 0..5 {
        hostile(&s);
    }
    // Two stats lines after the last refusal: still nothing started.
    let seen = s.output().len();
    assert!(eventually(WAIT, || s
        .output()
        .iter()
        .skip(seen)
        .filter(|l| l.starts_with("stats "))
        .count()
        >= 2));
    assert_eq!(s.stat("requests"), Some(0), "{:?}", s.output());
    assert_eq!(s.stat("active"), Some(0));
    assert_eq!(s.stat("streams"), Some(0));

    // A good client's stream while the refused ones keep coming: it ends
    // with every token, the same text as on a quiet server, and the
    // refused connections see none of it.
    let mut quiet = s.client_with(KEY.as_bytes());
    let want = text_of(&mut quiet, 200);
    drop(quiet);
    let addr = s.addr;
    let good = std::thread::spawn(move || {
        let (mut c, _) = Client::connect_hello(addr, KEY.as_bytes(), WAIT).unwrap();
        text_of(&mut c, 200)
    });
    while !good.is_finished() {
        hostile(&s);
    }
    assert_eq!(good.join().unwrap(), want, "the good stream's text is untouched");
    assert!(eventually(WAIT, || s.stat("active") == Some(0)));
    assert_eq!(
        s.stat("requests"),
        Some(2),
        "only the two good REQUESTs reached the backend"
    );
}
