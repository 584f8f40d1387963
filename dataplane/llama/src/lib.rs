//! llama.cpp `llama-server` backend of cnse-dp: HTTP/1.1 streaming on the
//! core's io_uring.
//!
//! Read first: [`backend`] (one request's life: route → connect or reuse a
//! pooled connection → send `POST /completion` → receive chunked SSE → TOKENS
//! / END / ERROR). The layers under it are pure: [`http`] decodes responses,
//! [`sse`] classifies event lines, [`body`] writes the request JSON. [`op`]
//! builds the ring operations. [`direct`] is a plain blocking client of the
//! same HTTP API for benchmarks (the gateway's baseline), [`standin`] a
//! fixed-pace stand-in for llama-server with its wire format; [`testing`] is
//! a small io_uring loop that drives a backend without the server.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub mod backend;
pub mod body;
pub mod direct;
pub mod http;
mod op;
pub mod prefix;
pub mod session;
pub mod sse;
pub mod standin;
pub mod testing;
mod ways;

pub use backend::LlamaBackend;
pub use body::completion_body;

/// Everything the llama backend can fail with at set-up.
#[derive(Debug, thiserror::Error)]
pub enum LlamaError {
    #[error("llama-server URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("llama backend config: {0}")]
    Config(String),
    #[error("{op} {url}: {source}")]
    Io {
        op: &'static str,
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {url}: {reason}")]
    Protocol {
        op: &'static str,
        url: String,
        reason: String,
    },
}

/// Settings of the llama-server backend.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// `http://host:port` of each llama-server (no path, no TLS).
    pub urls: Vec<String>,
    /// Requests in flight to one llama-server at most, over all cores
    /// (match its `-np` slots: more would queue inside llama-server where
    /// cancellation and fairness are out of our hands).
    pub inflight_per_backend: usize,
    /// TCP connect (including a pooled connection's re-connect).
    pub connect_timeout: Duration,
    /// From sending the request to the first token (prompt processing).
    pub first_token_timeout: Duration,
    /// Between two events of a stream that is not paused.
    pub idle_token_timeout: Duration,
    /// Period of `GET /health` per llama-server.
    pub health_interval: Duration,
    /// A health check not answered in this time counts as failed.
    pub health_timeout: Duration,
    /// Pooled connections idle longer than this are closed rather than
    /// reused (llama-server's own keep-alive timeout is 5 s).
    pub keepalive_idle: Duration,
    /// Sent as `cache_prompt`. Off by default: llama-server documents that
    /// reusing the KV cache may change results slightly (batch sizes differ),
    /// and answers through cnse-dp must equal a direct request's.
    pub cache_prompt: bool,
    /// Bytes of one SSE line (one JSON event) at most.
    pub event_bytes_max: usize,
    /// Receive buffer of one pooled connection.
    pub recv_buffer_bytes: usize,
    /// How a stream picks its llama-server (`--llama-route`).
    pub route: Route,
    /// Prefix routing leaves the server with the longest cached prefix for
    /// the least-loaded one when `in flight + 1` there is more than this
    /// factor times `in flight + 1` on the least-loaded server.
    pub prefix_load_factor: f32,
    /// Entries of each server's prefix index (`prefix::PrefixIndex`).
    pub prefix_entries: usize,
    /// Entries of the session table (`session::SessionTable`, one for all
    /// servers; `--llama-session-entries`).
    pub session_entries: usize,
    /// A stream that fails before its first token (connection refused or
    /// lost, HTTP 5xx or 429) is sent to another server up to this many
    /// times (`--llama-retries`; 0: never).
    pub retries_max: u8,
    /// Idle connections per llama-server per core kept connected ahead of
    /// requests, on connection slots of their own (at most
    /// `inflight_per_backend`: larger values are lowered to it; 0: none;
    /// one only, until the server is seen closing after each stream). llama-server
    /// closes its connection after every stream, so without a spare each
    /// request waits for a connect. Each spare holds one of llama-server's
    /// HTTP threads while it waits (`--threads-http`).
    pub spare_conns: usize,
    /// A stream whose server fails after tokens were delivered continues
    /// on another server from its text so far (`--llama-failover on`,
    /// within `retries_max` moves); off: it ends with ERROR 502.
    pub failover: bool,
    /// Generated text a stream keeps for failover, at most (per stream).
    /// A stream past it is not failed over (ERROR 502 as with failover
    /// off): the continuation's prompt would need the whole text.
    pub failover_text_bytes_max: usize,
    /// Spares per llama-server over all cores together
    /// (`--llama-spares-max`; 0: none). Beside it, a server never gets more
    /// spares than its free places (`inflight_per_backend` less the
    /// streams on it) + 1: each spare holds one of the server's HTTP
    /// threads (at least its slots + 2 by default), and a request sent on
    /// a connection that no thread has picked up waits for one.
    pub spares_max: usize,
}

/// How the backend picks a llama-server for a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Route {
    /// The healthy server with the fewest requests in flight.
    LeastOutstanding,
    /// The server whose cache holds the longest prefix of the prompt (by
    /// the shared prefix index), on the slot that holds it, unless that
    /// server is too loaded (`prefix_load_factor`); else least-outstanding.
    #[default]
    Prefix,
    /// Session affinity: a request with a session key (REQUEST flag,
    /// `X-Session-Id`) goes to the server (and slot) its key is pinned to
    /// while that server is healthy, has room and is within
    /// `prefix_load_factor` of the least-loaded one; else, and for requests
    /// without a key, as `Prefix`. The key is pinned to wherever its
    /// request went (`session::SessionTable`).
    Session,
}

impl Route {
    /// Whether llama-server's KV cache is used across requests (sent as
    /// `cache_prompt: true` whatever `LlamaConfig::cache_prompt` says).
    pub fn uses_cache(self) -> bool {
        self != Route::LeastOutstanding
    }
}

impl std::str::FromStr for Route {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "least-outstanding" => Ok(Route::LeastOutstanding),
            "prefix" => Ok(Route::Prefix),
            "session" => Ok(Route::Session),
            _ => Err(format!(
                "unknown route {s:?}: expected least-outstanding, prefix or session"
            )),
        }
    }
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            urls: Vec::new(),
            inflight_per_backend: 4,
            connect_timeout: Duration::from_secs(2),
            first_token_timeout: Duration::from_secs(60),
            idle_token_timeout: Duration::from_secs(30),
            health_interval: Duration::from_secs(2),
            health_timeout: Duration::from_secs(2),
            keepalive_idle: Duration::from_secs(4),
            cache_prompt: false,
            event_bytes_max: 64 * 1024,
            recv_buffer_bytes: 16 * 1024,
            route: Route::default(),
            prefix_load_factor: 2.0,
            prefix_entries: prefix::ENTRIES_DEFAULT,
            session_entries: session::ENTRIES_DEFAULT,
            retries_max: 2,
            spare_conns: 1,
            failover: true,
            failover_text_bytes_max: FAILOVER_TEXT_BYTES_DEFAULT,
            spares_max: SPARES_MAX_DEFAULT,
        }
    }
}

/// Default of `LlamaConfig::failover_text_bytes_max`: 64 KiB, some
/// 16,000 tokens of English text.
pub const FAILOVER_TEXT_BYTES_DEFAULT: usize = 64 * 1024;
/// Upper bound of `LlamaConfig::failover_text_bytes_max`.
pub const FAILOVER_TEXT_BYTES_MAX: usize = 16 << 20;
/// Default of `LlamaConfig::spares_max`: the free-places rule is what
/// bounds spares for one gateway; this bounds them when several share a
/// llama-server.
pub const SPARES_MAX_DEFAULT: usize = 8;

/// Upper bounds on the configuration, checked at construction.
pub const URLS_MAX: usize = 64;
pub const INFLIGHT_PER_BACKEND_MAX: usize = 1024;
/// Connection slots per core (`urls × (inflight_per_backend + spare_conns)`): each has its
/// receive buffer allocated up front, and `poll` visits each once a turn.
pub const SLOTS_PER_CORE_MAX: usize = 4096;

/// A validated `http://host:port` target.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    /// `host:port` as written, for the `Host` header.
    pub authority: String,
    pub addr: SocketAddr,
}

/// Parses and resolves `http://host:port` (an optional trailing `/` is
/// accepted; paths, queries, user info and https are not).
/// The id of the first model llama-server at `url` lists (`GET
/// /v1/models`), for the HTTP front's model list; `None` when it cannot
/// tell (old server, unreachable within `timeout`).
pub fn served_model(url: &str, timeout: std::time::Duration) -> Option<String> {
    let v = get_json(url, "/v1/models", timeout)?;
    v["data"][0]["id"].as_str().map(str::to_string)
}

/// A blocking `GET path` answered 200 with JSON (start-up probes only).
fn get_json(url: &str, path: &str, timeout: Duration) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let t = parse_url(url).ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&t.addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.authority
    )
    .ok()?;
    // Read until the body is complete (a server may keep the connection
    // open whatever `Connection: close` asked), 1 MiB at most.
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    let complete = |raw: &[u8]| -> bool {
        let Some(at) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
        if let Some(v) = head.split("content-length:").nth(1) {
            let n: usize = v.lines().next().unwrap_or("").trim().parse().unwrap_or(usize::MAX);
            return raw.len() - (at + 4) >= n;
        }
        head.contains("transfer-encoding: chunked") && raw.ends_with(b"0\r\n\r\n")
    };
    while !complete(&raw) && raw.len() < 1 << 20 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if !raw.starts_with(b"HTTP/1.1 200") && !raw.starts_with(b"HTTP/1.0 200") {
        return None;
    }
    let head = String::from_utf8_lossy(&raw[..at]).to_ascii_lowercase();
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&raw[at..])?
    } else {
        raw[at..].to_vec()
    };
    serde_json::from_slice(&body).ok()
}

fn dechunk(mut s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = s.windows(2).position(|w| w == b"\r\n")?;
        let n = usize::from_str_radix(std::str::from_utf8(&s[..eol]).ok()?.trim(), 16).ok()?;
        if n == 0 {
            return Some(out);
        }
        out.extend_from_slice(s.get(eol + 2..eol + 2 + n)?);
        s = s.get(eol + 4 + n..)?;
    }
}

pub fn parse_url(url: &str) -> Result<Target, LlamaError> {
    let bad = |reason: &str| LlamaError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("must start with http:// (https is not supported)"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err(bad("no host"));
    }
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("only http://host:port is accepted (no path, query or user info)"));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| bad("a port is required (http://host:port)"))?;
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port: u16 = port.parse().map_err(|_| bad("port must be a number 1-65535"))?;
    if port == 0 {
        return Err(bad("port must be a number 1-65535"));
    }
    let host_bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let addr = (host_bare, port)
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve host: {e}")))?
        .next()
        .ok_or_else(|| bad("host resolves to no address"))?;
    Ok(Target {
        url: url.to_string(),
        authority: authority.to_string(),
        addr,
    })
}

/// State of one llama-server shared by the backends of all cores.
#[derive(Debug)]
pub(crate) struct Shared {
    pub target: Target,
    /// Requests in flight (reserved) over all cores.
    pub inflight: AtomicUsize,
    pub healthy: AtomicBool,
    /// Prompt prefixes recently sent to this server (prefix routing).
    pub index: prefix::PrefixIndex,
    /// llama-server's slots we may use (`LlamaFactory::learn_slots`; 0:
    /// unknown, no `id_slot` is sent), and per slot (up to
    /// `inflight_per_backend`) whether one of our streams is on it and when
    /// it was last given one (a stamp of `slot_clock`).
    pub slots_known: AtomicUsize,
    pub slot_busy: Box<[AtomicBool]>,
    pub slot_used: Box<[AtomicU32]>,
    pub slot_clock: AtomicU32,
    /// Prompt tokens llama-server took from its cache and evaluated, from
    /// the last event's `timings` of every stream.
    pub cache_n: AtomicU64,
    pub prompt_n: AtomicU64,
    /// Connections opened ahead (spares) over all cores, as each core last
    /// published them; a core opens one only while this is below
    /// `LlamaConfig::spares_max`.
    pub spares: AtomicUsize,
}

impl Shared {
    fn new(target: Target, slots: usize, index_entries: usize) -> Self {
        Self {
            target,
            inflight: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            index: prefix::PrefixIndex::new(index_entries),
            slots_known: AtomicUsize::new(0),
            slot_busy: (0..slots).map(|_| AtomicBool::new(false)).collect(),
            slot_used: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            slot_clock: AtomicU32::new(0),
            cache_n: AtomicU64::new(0),
            prompt_n: AtomicU64::new(0),
            spares: AtomicUsize::new(0),
        }
    }
}

/// Prompt-cache counters of one llama-server over all cores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Prompt tokens llama-server took from its KV cache (`cache_n`).
    pub cached_tokens: u64,
    /// Prompt tokens it evaluated (`prompt_n`).
    pub evaluated_tokens: u64,
}

/// llama-server's slot count from its `GET /slots` (`None` when it does not
/// answer within `timeout` or the endpoint is off).
pub fn slot_count(url: &str, timeout: Duration) -> Option<usize> {
    let v = get_json(url, "/slots", timeout)?;
    v.as_array().map(Vec::len).filter(|&n| n > 0)
}

/// Builds one [`LlamaBackend`] per core; the cores share each llama-server's
/// in-flight count and health.
pub struct LlamaFactory {
    cfg: LlamaConfig,
    shared: Arc<[Shared]>,
    /// Session key → server, shared by all cores (`Route::Session`).
    sessions: Arc<session::SessionTable>,
    /// The first backend built runs the health checks for all cores.
    health_owner_taken: AtomicBool,
}

impl LlamaFactory {
    pub fn new(mut cfg: LlamaConfig) -> Result<Self, LlamaError> {
        if cfg.urls.is_empty() {
            return Err(LlamaError::Config("at least one llama-server URL is required".into()));
        }
        if cfg.urls.len() > URLS_MAX {
            return Err(LlamaError::Config(format!("at most {URLS_MAX} llama-server URLs")));
        }
        if cfg.inflight_per_backend == 0 || cfg.inflight_per_backend > INFLIGHT_PER_BACKEND_MAX {
            return Err(LlamaError::Config(format!(
                "inflight_per_backend must be 1..={INFLIGHT_PER_BACKEND_MAX}"
            )));
        }
        // More spares than places could never be taken at once.
        cfg.spare_conns = cfg.spare_conns.min(cfg.inflight_per_backend);
        if cfg.urls.len() * (cfg.inflight_per_backend + cfg.spare_conns) > SLOTS_PER_CORE_MAX {
            return Err(LlamaError::Config(format!(
                "{} URLs x (inflight_per_backend {} + spare_conns {}) is above {SLOTS_PER_CORE_MAX} connection slots per core",
                cfg.urls.len(),
                cfg.inflight_per_backend,
                cfg.spare_conns
            )));
        }
        if cfg.recv_buffer_bytes > 1 << 20 || cfg.event_bytes_max > 16 << 20 {
            return Err(LlamaError::Config(
                "recv_buffer_bytes must be <= 1 MiB and event_bytes_max <= 16 MiB".into(),
            ));
        }
        for (name, d) in [
            ("connect_timeout", cfg.connect_timeout),
            ("first_token_timeout", cfg.first_token_timeout),
            ("idle_token_timeout", cfg.idle_token_timeout),
            ("health_interval", cfg.health_interval),
            ("health_timeout", cfg.health_timeout),
        ] {
            if d.is_zero() {
                return Err(LlamaError::Config(format!("{name} must be > 0")));
            }
        }
        if cfg.failover_text_bytes_max > FAILOVER_TEXT_BYTES_MAX {
            return Err(LlamaError::Config(format!(
                "failover_text_bytes_max must be <= {FAILOVER_TEXT_BYTES_MAX}"
            )));
        }
        if !(cfg.prefix_load_factor.is_finite() && cfg.prefix_load_factor >= 1.0) {
            return Err(LlamaError::Config("prefix_load_factor must be >= 1".into()));
        }
        if cfg.event_bytes_max < 1024 || cfg.recv_buffer_bytes < 1024 {
            return Err(LlamaError::Config(
                "event_bytes_max and recv_buffer_bytes must be >= 1024".into(),
            ));
        }
        let mut shared = Vec::with_capacity(cfg.urls.len());
        for url in &cfg.urls {
            let target = parse_url(url)?;
            if shared.iter().any(|s: &Shared| s.target.addr == target.addr) {
                return Err(LlamaError::Config(format!("llama-server {url} listed twice")));
            }
            // Room for every slot a stream may take; how many exist is
            // learnt by `learn_slots`.
            let slots = cfg.inflight_per_backend.min(prefix::SLOT_ID_MAX + 1);
            shared.push(Shared::new(target, slots, cfg.prefix_entries));
        }
        // The table is allocated only when the policy reads it.
        let session_entries = if cfg.route == Route::Session {
            cfg.session_entries
        } else {
            0
        };
        Ok(Self {
            sessions: Arc::new(session::SessionTable::new(session_entries)),
            cfg,
            shared: shared.into(),
            health_owner_taken: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// The session table (its bound and use: tests, stats).
    pub fn sessions(&self) -> &session::SessionTable {
        &self.sessions
    }

    /// Prompt-cache counters per llama-server (URL order), over all cores.
    pub fn cache_counters(&self) -> Vec<CacheCounters> {
        self.shared
            .iter()
            .map(|s| CacheCounters {
                cached_tokens: s.cache_n.load(Ordering::Relaxed),
                evaluated_tokens: s.prompt_n.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Asks every llama-server for its slots (`GET /slots`, blocking, at
    /// most `connect_timeout` each) so that streams can be put on the slot
    /// that holds their prefix (`id_slot`). Returns what each answered
    /// (0: no answer; then no `id_slot` goes to it). Call once at
    /// start-up, before serving; without it no `id_slot` is sent.
    pub fn learn_slots(&self) -> Vec<usize> {
        self.shared
            .iter()
            .map(|s| {
                let n = slot_count(&s.target.url, self.cfg.connect_timeout).unwrap_or(0);
                s.slots_known.store(n.min(s.slot_busy.len()), Ordering::Release);
                n
            })
            .collect()
    }

    /// Builds a backend directly (what `build` does, typed).
    pub fn backend(&self) -> LlamaBackend {
        let health_owner = !self.health_owner_taken.swap(true, std::sync::atomic::Ordering::AcqRel);
        LlamaBackend::new(
            self.cfg.clone(),
            self.shared.clone(),
            self.sessions.clone(),
            health_owner,
        )
    }
}

impl cnse_backend::BackendFactory for LlamaFactory {
    fn build(&self, _core: usize) -> Result<Box<dyn cnse_backend::Backend>, String> {
        Ok(Box::new(self.backend()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_validated() {
        assert_eq!(parse_url("http://127.0.0.1:8081").unwrap().addr.port(), 8081);
        assert_eq!(parse_url("http://127.0.0.1:8081/").unwrap().authority, "127.0.0.1:8081");
        assert!(parse_url("http://localhost:9").is_ok());
        assert!(parse_url("http://[::1]:9").unwrap().addr.is_ipv6());
        for bad in [
            "https://127.0.0.1:1",
            "127.0.0.1:1",
            "http://127.0.0.1",
            "http://127.0.0.1:0",
            "http://127.0.0.1:99999",
            "http://127.0.0.1:1/completion",
            "http://u@127.0.0.1:1",
            "http://:1",
            "http://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn factory_checks_config() {
        assert!(LlamaFactory::new(LlamaConfig::default()).is_err());
        let ok = LlamaConfig {
            urls: vec!["http://127.0.0.1:1".into()],
            ..Default::default()
        };
        assert!(LlamaFactory::new(ok.clone()).is_ok());
        let twice = LlamaConfig {
            urls: vec!["http://127.0.0.1:1".into(), "http://127.0.0.1:1/".into()],
            ..Default::default()
        };
        assert!(LlamaFactory::new(twice).is_err());
        let zero = LlamaConfig {
            inflight_per_backend: 0,
            ..ok
        };
        assert!(LlamaFactory::new(zero).is_err());
    }
}
