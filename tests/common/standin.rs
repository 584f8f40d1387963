//! A `cnse-dp llama-standin` process (llama-server's wire format at a fixed
//! pace), for the suites that put the llama gateway in front of stand-ins.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `cnse-dp llama-standin` process, killed on drop.
pub struct Standin {
    child: Child,
    /// `http://ADDR`, from its `listening on` line.
    pub url: String,
}

impl Standin {
    /// Starts a stand-in paced by `ttft_us` and `token_interval_us` and
    /// waits for its `listening on URL` line.
    pub fn start(ttft_us: u64, token_interval_us: u64) -> Standin {
        let (ttft, interval) = (ttft_us.to_string(), token_interval_us.to_string());
        let mut child = Command::new(env!("CARGO_BIN_EXE_cnse-dp"))
            .args(["llama-standin", "--ttft-us", &ttft, "--token-interval-us", &interval])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning cnse-dp llama-standin");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .expect("the stand-in's first line");
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line {line:?}"))
            .to_string();
        Standin { child, url }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
