//! The server under soak: a `cnse-dp serve` this process starts (the
//! synthetic backend at a model's pace, `/metrics` on a second port), or
//! one that is already running.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use super::sample::{self, Server};
use super::Args;

/// How long a started server gets to print its addresses.
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Target {
    pub pid: u32,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    child: Option<Child>,
}

impl Target {
    pub fn given(addr: SocketAddr, pid: u32, metrics: SocketAddr) -> Self {
        Self {
            pid,
            addr,
            metrics,
            child: None,
        }
    }

    /// Starts `cnse-dp serve` on loopback ports; its log goes to
    /// `OUT/server.log`.
    pub fn start(a: &Args) -> anyhow::Result<Self> {
        let log_path = a.out.join("server.log");
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let exe = std::env::current_exe().context("finding the cnse-dp binary")?;
        let mut child = Command::new(exe)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--no-pin",
            ])
            .args(["--threads", &a.server_threads.to_string()])
            .args(["--synthetic-ttft-us", &a.synthetic_ttft_us.to_string()])
            .args([
                "--synthetic-token-interval-us",
                &a.synthetic_token_interval_us.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("starting cnse-dp serve")?;
        let stdout = child.stdout.take().context("the server's stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the two address lines, then keeps the pipe drained.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (mut addr, mut metrics) = (None, None);
        while addr.is_none() || metrics.is_none() {
            let Ok(line) = rx.recv_timeout(START_TIMEOUT) else {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "cnse-dp serve printed no addresses within {} s (see {})",
                    START_TIMEOUT.as_secs(),
                    log_path.display()
                );
            };
            let parse = |p: &str| {
                line.strip_prefix(p)
                    .and_then(|a| a.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            addr = addr.or(parse("listening on "));
            metrics = metrics.or(parse("metrics listening on "));
        }
        Ok(Self {
            pid: child.id(),
            addr: addr.context("listening address")?,
            metrics: metrics.context("metrics address")?,
            child: Some(child),
        })
    }

    /// The server now; None once it is gone or does not answer.
    pub fn sample(&self) -> Option<Server> {
        let (rss_kib, fds, threads) = sample::proc_of(self.pid)?;
        let mut s = Server {
            rss_kib,
            fds,
            threads,
            ..Server::default()
        };
        match sample::scrape(self.metrics, &mut s) {
            Ok(()) => Some(s),
            Err(e) => {
                eprintln!("soak: {e}");
                None
            }
        }
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => sample::proc_of(self.pid).is_some(),
        }
    }

    /// Stops a server this process started: SIGTERM (a graceful drain),
    /// then SIGKILL if it is still there after 10 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            if pid > 0 {
                // SAFETY: kill sends a signal to our own child, a positive
                // pid that we have not yet waited for.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        for _ in 0..100 {
            if !matches!(c.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
