//! What a run is asked to do: the stream mode and the run's shape, checked
//! at the edge before any thread starts.

use std::net::SocketAddr;
use std::time::Duration;

use super::{CONNECTIONS_MAX, INFLIGHT_MAX, OPEN_LOOP_TICK_US_DEFAULT};
use crate::{ClientError, CLIENT_PAYLOAD_BYTES_MAX};

/// What each stream does.
#[derive(Debug, Clone)]
pub enum Mode {
    /// PING with `payload_bytes` of payload; the PONG ends the exchange.
    Ping { payload_bytes: usize },
    /// REQUEST for `max_tokens` tokens with `credit` tokens of credit (0 =
    /// unlimited); the client re-grants credit as tokens arrive.
    Generate {
        max_tokens: u32,
        credit: u32,
        temperature: f32,
        prompt: String,
    },
    /// Streaming OpenAI completions over HTTP/1.1 (`POST /v1/completions`,
    /// `"stream": true`), `inflight` pipelined per keep-alive connection;
    /// the response's end (after `data: [DONE]`) ends the exchange.
    Http {
        max_tokens: u32,
        temperature: f32,
        prompt: String,
        /// Ask for the usage chunk (`stream_options.include_usage`): a
        /// server that packs several tokens into one event then says how
        /// many there were (costs the server one more event per request).
        include_usage: bool,
    },
    /// PING in RESP (`*1\r\n$4\r\nPING\r\n`) to a redis-compatible
    /// server such as redis-server, `inflight` pipelined per connection;
    /// the `+PONG` answers come back in order. The same load, on the same
    /// engine, that [`Mode::Ping`] puts on cnse-dp: the two servers are
    /// compared with nothing else changed.
    Resp,
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Ping { .. } => "ping",
            Mode::Generate { .. } => "generate",
            Mode::Http { .. } => "http",
            Mode::Resp => "resp",
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub addr: SocketAddr,
    pub connections: usize,
    pub inflight: usize,
    pub threads: usize,
    pub mode: Mode,
    /// Requests per second for an open loop; `None` runs a closed loop.
    pub rate_per_s: Option<f64>,
    pub duration: Duration,
    pub warmup: Duration,
    /// HELLO auth token (empty for none).
    pub auth_token: Vec<u8>,
    /// After the run, how long streams still in flight may take to finish.
    pub drain_timeout: Duration,
    pub connect_timeout: Duration,
    /// CPUs to pin client threads to (round robin); empty leaves them free.
    pub cpus: Vec<usize>,
    /// Open loop: the shortest sleep between sends. Requests that fall due
    /// within a tick are sent together (a wake-up per request would cost a
    /// syscall each); their latency is still measured from their intended
    /// times, so the tick shows in the percentiles (at most one tick).
    pub open_loop_tick: Duration,
    /// Client threads poll their rings instead of sleeping while the run
    /// lasts: each request leaves at its intended time (no tick), replies
    /// are read as they land, and the server never pays for waking a
    /// sleeping client. Costs a full core per client thread.
    pub busy_poll: bool,
    /// A local server process whose CPU time over the measured window is
    /// reported (throughput per server CPU-second holds up on a shared
    /// machine where wall-clock rates do not).
    pub server_pid: Option<u32>,
    /// The process's allocation counter (a counting global allocator, as
    /// `cnse-dp` installs): allocations during the window are reported,
    /// which should be none per frame.
    pub allocation_counter: Option<fn() -> u64>,
    /// Stop after this many measured requests (split evenly over the
    /// threads); the window then ends with the last of them and
    /// `duration` is only a cap.
    pub requests: Option<u64>,
}

impl LoadConfig {
    pub fn new(addr: SocketAddr, mode: Mode) -> Self {
        Self {
            addr,
            connections: 64,
            inflight: 1,
            threads: 1,
            mode,
            rate_per_s: None,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            auth_token: Vec::new(),
            drain_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            cpus: Vec::new(),
            open_loop_tick: Duration::from_micros(OPEN_LOOP_TICK_US_DEFAULT),
            busy_poll: false,
            server_pid: None,
            allocation_counter: None,
            requests: None,
        }
    }

    pub(super) fn check(&self) -> Result<(), ClientError> {
        let bad = |m: String| Err(ClientError::Load(m));
        if self.connections == 0 || self.connections > CONNECTIONS_MAX {
            return bad(format!("connections must be in 1..={CONNECTIONS_MAX}"));
        }
        if self.inflight == 0 || self.inflight > INFLIGHT_MAX {
            return bad(format!("inflight must be in 1..={INFLIGHT_MAX}"));
        }
        if self.threads == 0 || self.threads > self.connections {
            return bad("threads must be in 1..=connections".to_string());
        }
        if self.duration.is_zero() {
            return bad("duration must be > 0".to_string());
        }
        if let Some(n) = self.requests {
            if n < self.threads as u64 {
                return bad("requests must be at least one per thread".to_string());
            }
        }
        if let Some(r) = self.rate_per_s {
            if !(r.is_finite() && r > 0.0) {
                return bad(format!("rate must be a positive number, got {r}"));
            }
        }
        match &self.mode {
            Mode::Ping { payload_bytes } if *payload_bytes > CLIENT_PAYLOAD_BYTES_MAX as usize => {
                bad("ping payload too large".to_string())
            }
            Mode::Generate { max_tokens: 0, .. } | Mode::Http { max_tokens: 0, .. } => {
                bad("max_tokens must be > 0".to_string())
            }
            _ => Ok(()),
        }
    }
}
