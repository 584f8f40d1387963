//! Helpers of issue 11's fault and bad-input suites (`tests/fault_*.rs`): a
//! seeded RNG whose seed is printed (replay with `CNSE_FAULT_SEED`), the
//! server's descriptors, connection and memory figures, percentiles.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::Duration;

use super::{eventually, Server};

/// xorshift64*: small, deterministic from its seed, good enough to pick
/// faults and bytes.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }

    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next_u64() as u8;
        }
    }
}

/// The test's seed: `CNSE_FAULT_SEED` when set, else the clock; printed
/// (stdout and stderr) so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("CNSE_FAULT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("{test}: seed {s} (replay: CNSE_FAULT_SEED={s})");
    println!("{test}: seed {s} (replay: CNSE_FAULT_SEED={s})");
    s
}

/// Descriptors the process holds (/proc/PID/fd).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Closes with SO_LINGER 0: the server sees a reset, whatever is in flight.
pub fn reset(s: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads a valid linger struct of the given size on
    // an open socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// Nearest-rank percentile (`p` in 0..=100) of `v` (sorted here).
pub fn percentile(v: &mut [Duration], p: f64) -> Duration {
    assert!(!v.is_empty(), "percentile of nothing");
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// What a user checks of a server at rest (its stats line saying no
/// connection, stream or backend work): its descriptors and resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub fds: usize,
    pub rss_kib: u64,
}

impl Footprint {
    /// Waits (bounded) until a stats line printed after this call says no
    /// connection, stream or backend work is left, then takes the figures.
    /// The server must run with `--stats-interval-ms`.
    pub fn at_rest(s: &Server, within: Duration) -> Result<Footprint, String> {
        let since = s.output().len();
        let mut last = None;
        let idle = || {
            let out = s.output();
            let Some(line) = out.iter().skip(since).rev().find_map(|l| l.strip_prefix("stats ")) else {
                return false;
            };
            let get = |k: &str| {
                line.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| v.parse::<u64>().ok())
            };
            last = Some(line.to_string());
            get("conns") == Some(0) && get("streams") == Some(0) && get("active") == Some(0)
        };
        if !eventually(within, idle) {
            return Err(format!("not at rest after {within:?}: last stats line {last:?}"));
        }
        Ok(Footprint {
            fds: open_fds(s.pid()),
            rss_kib: s.rss_kib(),
        })
    }

    /// Asserts `after` is back at this baseline: no more descriptors, and
    /// resident memory at most `rss_slack_kib` above.
    pub fn assert_back(&self, what: &str, after: Footprint, rss_slack_kib: u64) {
        eprintln!("{what}: baseline {self:?}, after {after:?}");
        assert!(
            after.fds <= self.fds,
            "{what}: {} descriptors, {} at baseline",
            after.fds,
            self.fds
        );
        assert!(
            after.rss_kib <= self.rss_kib + rss_slack_kib,
            "{what}: RSS {} KiB, {} KiB at baseline (slack {rss_slack_kib} KiB)",
            after.rss_kib,
            self.rss_kib
        );
    }
}

/// The RSS slack of the suites' runs of thousands of connections or
/// streams: under 100 bytes a cycle over 10,000, so one leaked allocation
/// per connection or stream would show.
pub const RSS_SLACK_KIB: u64 = 1_024;
