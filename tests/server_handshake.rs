//! Issue 2: the handshake rules of the page (HELLO first and exactly once,
//! auth token checked before any REQUEST is read).

mod common;
use common::*;

use std::io::Write as _;

fn key_file(key: &str) -> (tempdir::Dir, String) {
    let dir = tempdir::Dir::new();
    let path = dir.path.join("auth.key");
    let mut f = std::fs::File::create(&path).unwrap();
    // A trailing newline is not part of the key.
    writeln!(f, "{key}").unwrap();
    // Only the owner may read a key file (issue 11).
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir, path.to_str().unwrap().to_string())
}

mod tempdir {
    pub struct Dir {
        pub path: std::path::PathBuf,
    }
    impl Dir {
        pub fn new() -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("cnse-test-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&path).unwrap();
            Self { path }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[test]
fn issue2_hello_without_auth_key() {
    let s = Server::start(&[]);
    let mut c = s.raw();
    let ack = c.hello(b"").unwrap();
    assert_eq!(ack.features, 0);
    assert_eq!(ack.payload_bytes_max, 1 << 20, "default payload limit announced in aux");
    assert!(!ack.server.is_empty(), "HELLO_ACK names the server");
    let g = c.generate(1, 0, &params(4), "hi", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 4);
}

#[test]
fn issue2_hello_with_the_right_auth_key() {
    let (_dir, path) = key_file("s3cret-key");
    let s = Server::start(&["--auth-key-file", &path]);
    let mut c = s.raw();
    c.hello(b"s3cret-key").unwrap();
    let g = c.generate(1, 0, &params(3), "hi", |_, _| {}).unwrap();
    assert_eq!(g.tokens, 3);
}

#[test]
fn issue2_wrong_or_missing_auth_token_is_401_then_close() {
    let (_dir, path) = key_file("s3cret-key");
    let s = Server::start(&["--auth-key-file", &path]);
    for token in [&b""[..], b"wrong", b"s3cret-key\n", b"s3cret-ke"] {
        let mut c = s.raw();
        c.send_hello(token).unwrap();
        expect_violation(&mut c, 401);
    }
}

#[test]
fn issue2_bad_token_closes_before_any_request_is_read() {
    let (_dir, path) = key_file("k");
    let s = Server::start(&["--auth-key-file", &path]);
    let mut c = s.raw();
    // HELLO and a REQUEST in one write: the REQUEST must not be served.
    let mut bytes = Vec::new();
    cnse_proto::put_hello(&mut bytes, b"nope");
    cnse_proto::put_request(&mut bytes, 1, 0, &params(4), b"hi");
    c.write_raw(&bytes).unwrap();
    let frames = expect_violation(&mut c, 401);
    assert_eq!(frames.len(), 1, "only the ERROR: {frames:?}");
}

#[test]
fn issue2_first_frame_not_hello_is_400() {
    let s = Server::start(&[]);
    for first in [Kind::Ping, Kind::Request, Kind::Credit, Kind::Cancel] {
        let mut c = s.raw();
        let mut bytes = Vec::new();
        match first {
            Kind::Request => cnse_proto::put_request(&mut bytes, 1, 0, &params(4), b"hi"),
            Kind::Ping => cnse_proto::put_ping(&mut bytes, 0, 0, 0, b"x"),
            Kind::Credit => cnse_proto::put_credit(&mut bytes, 1, 1),
            _ => cnse_proto::put_cancel(&mut bytes, 1),
        }
        c.write_raw(&bytes).unwrap();
        let frames = expect_violation(&mut c, 400);
        assert_eq!(frames.len(), 1, "{first:?} first: {frames:?}");
    }
}

#[test]
fn issue2_second_hello_is_400() {
    let s = Server::start(&[]);
    let mut c = s.client();
    c.send_hello(b"").unwrap();
    expect_violation(&mut c, 400);
}

#[test]
fn issue2_client_cli_prints_tokens_and_times() {
    let s = Server::start(&[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args([
            "client",
            "--addr",
            &s.addr.to_string(),
            "--prompt",
            "hello",
            "--max-tokens",
            "5",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!out.stdout.is_empty(), "tokens on stdout");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("5 tokens") && err.contains("TTFT"), "{err}");
}

#[test]
fn issue2_client_cli_one_line_error_and_nonzero_exit() {
    let (_dir, path) = key_file("k");
    let s = Server::start(&["--auth-key-file", &path]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args(["client", "--addr", &s.addr.to_string(), "--prompt", "hello"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("401"), "{err}");
    // Bad parameters: ERROR on the stream, also one line.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
        .args([
            "client",
            "--addr",
            &s.addr.to_string(),
            "--prompt",
            "x",
            "--auth-key-file",
            &path,
        ])
        .args(["--max-tokens", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("400"), "{err}");
}

#[test]
fn issue14_hello_features_granted_are_the_defined_ones_asked_for() {
    let server = Server::start(&[]);
    for (wanted, granted) in [
        (0, 0),
        (cnse_proto::FEATURE_FAILOVER_MARK, cnse_proto::FEATURE_FAILOVER_MARK),
        // Bits no extension defines are not granted, and not a violation.
        (u32::MAX, cnse_proto::FEATURES_DEFINED),
        (1 << 31, 0),
    ] {
        let mut c = server.raw();
        let ack = c.hello_features(b"", wanted).unwrap();
        assert_eq!(ack.features, granted, "wanted {wanted:#x}");
        // Without a failover, END is unmarked whatever was granted.
        let params = Params {
            max_tokens: 4,
            ..Params::default()
        };
        let g = c.generate(1, 0, &params, "hello", |_, _| {}).unwrap();
        assert_eq!((g.tokens, g.failed_over), (4, false));
    }
}
