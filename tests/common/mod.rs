//! Helpers shared by the `tests/server_*.rs` suites: the real `cnse-dp`
//! binary started on an ephemeral loopback port, handshaken clients, raw
//! header builders and bounded waits.
#![allow(dead_code, unused_imports)]

pub mod fault;
pub mod standin;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use cnse_client::{Client, ClientError, OwnedFrame};
pub use cnse_proto::{FinishReason, HeaderMut, Kind, Params, HEADER_BYTES};

/// Upper bound on any single wait for the server in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `cnse-dp serve` child process, killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// Every line the server printed after its address, stdout and stderr.
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `cnse-dp serve --listen 127.0.0.1:0 --threads 1 --no-pin` plus
    /// `extra` and waits for its `listening on ADDR` line. Unpinned: tests
    /// run side by side, and pinning every test server to core 0 would
    /// stack them on one core.
    pub fn start(extra: &[&str]) -> Server {
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--no-pin"];
        if !extra.contains(&"--threads") {
            args.extend(["--threads", "1"]);
        }
        args.extend(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning cnse-dp serve");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let l = lines.clone();
        std::thread::spawn(move || {
            let mut first = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match first.take() {
                    Some(tx) => {
                        let _ = tx.send(line);
                    }
                    None => l.lock().unwrap().push(line),
                }
            }
        });
        let l = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.lock().unwrap().push(format!("stderr: {line}"));
            }
        });
        let first = match rx.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "cnse-dp serve {args:?} printed no address; output: {:?}",
                    lines.lock().unwrap()
                );
            }
        };
        let addr = first
            .strip_prefix("listening on ")
            .and_then(|a| a.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("first line {first:?} is not `listening on ADDR`"));
        Server { child, addr, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lines printed so far (after the address line).
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Resident memory of the server process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("reading /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc status")
    }

    /// A counter of the server's latest `stats` line (`--stats-interval-ms`),
    /// by key (`active`, `paused`, `produced`, `allocs`, ...).
    pub fn stat(&self, key: &str) -> Option<u64> {
        let prefix = format!("{key}=");
        self.output()
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("stats "))
            .and_then(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix(prefix.as_str())))
            .and_then(|v| v.parse().ok())
    }

    /// The server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits up to `within` for the server to exit; its status, or `None`
    /// while it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let end = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
                _ => return None,
            }
        }
    }

    /// A connected client, before any frame.
    pub fn raw(&self) -> Client {
        Client::connect(self.addr, WAIT).expect("connecting")
    }

    /// A connected, handshaken client (no auth token).
    pub fn client(&self) -> Client {
        self.client_with(b"")
    }

    pub fn client_with(&self, token: &[u8]) -> Client {
        let (c, _ack) = Client::connect_hello(self.addr, token, WAIT).expect("connect + HELLO");
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- server output ---");
            for l in self.lines.lock().unwrap().iter() {
                eprintln!("{l}");
            }
        }
    }
}

/// Arguments for a synthetic backend of a given speed (µs).
pub fn synthetic(ttft_us: u64, token_interval_us: u64) -> Vec<String> {
    vec![
        "--synthetic-ttft-us".into(),
        ttft_us.to_string(),
        "--synthetic-token-interval-us".into(),
        token_interval_us.to_string(),
    ]
}

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

pub fn params(max_tokens: u32) -> Params {
    Params {
        max_tokens,
        ..Params::default()
    }
}

/// A valid header of `kind` (then bent by the caller).
pub fn header(kind: Kind, stream_id: u64, payload_len: u32, arg: u32) -> [u8; HEADER_BYTES] {
    let mut b = [0u8; HEADER_BYTES];
    HeaderMut::new(&mut b).set(kind, 0, stream_id, payload_len, arg, 0);
    b
}

/// Reads to the close and asserts the server's last words were exactly one
/// ERROR `code` on stream 0 (frames of open streams may come before it).
pub fn expect_violation(c: &mut Client, code: u32) -> Vec<OwnedFrame> {
    let frames = c.read_until_closed(WAIT).expect("server closes the connection");
    let errors: Vec<&OwnedFrame> = frames.iter().filter(|f| f.kind == Kind::Error).collect();
    assert_eq!(errors.len(), 1, "one ERROR before the close: {frames:?}");
    let e = errors[0];
    assert_eq!((e.stream_id, e.arg), (0, code), "ERROR {}: {}", e.arg, e.text());
    assert!(!e.payload.is_empty(), "ERROR carries a message");
    assert_eq!(
        frames.last().unwrap().kind,
        Kind::Error,
        "nothing after the ERROR: {frames:?}"
    );
    frames
}

/// Reads frames of one stream until its END or ERROR, returning all.
pub fn read_stream(c: &mut Client, stream_id: u64) -> Vec<OwnedFrame> {
    let mut out = Vec::new();
    loop {
        let f = c.next_frame().expect("frame");
        assert_eq!(f.stream_id, stream_id, "unexpected frame {f:?}");
        let last = matches!(f.kind, Kind::End | Kind::Error);
        out.push(f);
        if last {
            return out;
        }
    }
}

/// Sum of TOKENS `arg` in `frames`.
pub fn token_count(frames: &[OwnedFrame]) -> u64 {
    frames
        .iter()
        .filter(|f| f.kind == Kind::Tokens)
        .map(|f| u64::from(f.arg))
        .sum()
}

/// Polls `cond` until true or `within` passes.
pub fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// Raises RLIMIT_NOFILE of this process (and the children it starts) to
/// at least `want`, up to the hard limit; returns the soft limit after.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit read and write a plain struct we own.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 0;
        }
        if r.rlim_cur < want {
            let target = want.min(r.rlim_max);
            let mut n = r;
            n.rlim_cur = target;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &n) != 0 {
                // As root the hard limit may be raised too.
                n.rlim_max = want;
                n.rlim_cur = want;
                let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &n);
            }
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
        r.rlim_cur
    }
}
