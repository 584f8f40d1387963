//! The cnse-dp server: one thread per core, one io_uring per thread.
//!
//! Each worker owns a `SO_REUSEPORT` listener on the shared address (the
//! kernel spreads connections evenly), a multishot accept, a provided-buffer
//! ring that every connection's multishot recv draws from, its connections
//! and streams (preallocated slabs), a bounded admission queue and one
//! backend instance. See `docs/ARCHITECTURE.md` for the request flow.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use cnse_backend::BackendFactory;

mod auth;
pub use auth::Secret;
mod conn;
mod http;
mod io_modes;
pub use io_modes::{RecvMode, SendMode};
mod listen;
pub mod metrics;
pub mod session;
pub mod sim;
pub mod stages;
pub mod stream;
pub mod tasks;
pub mod transport;
mod worker;

pub use cnse_proto::{MAX_TOKENS_LIMIT_DEFAULT, PAYLOAD_BYTES_MAX_DEFAULT};
/// The HTTP front's request parser, pure (the `http_request` fuzz target).
pub use http::parse as http_parse;

/// Server limits and settings. Every queue and table is bounded by one of
/// these.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Worker threads (one io_uring each); 0 means one per available core.
    pub threads: usize,
    /// Pin worker i to core i.
    pub pin_threads: bool,
    /// Join addresses that other processes already serve with
    /// SO_REUSEPORT (the kernel splits new connections among them) instead
    /// of refusing a busy address.
    pub join_listen: bool,
    /// Largest accepted `payload_len` (413 above).
    pub payload_bytes_max: u32,
    /// Largest accepted `max_tokens`.
    pub max_tokens_limit: u32,
    /// Connections per worker thread.
    pub conns_per_thread_max: usize,
    /// Open streams per connection (429 above).
    pub streams_per_conn_max: usize,
    /// Streams per worker thread, all connections together (429 above).
    pub streams_per_thread_max: usize,
    /// Tokens buffered per stream waiting for credit before the backend is
    /// paused.
    pub stream_buffered_tokens_max: usize,
    /// Bytes buffered per stream waiting for credit before the backend is
    /// paused.
    pub stream_buffered_bytes_max: usize,
    /// Requests waiting for backend capacity, per worker thread: the
    /// process's scheduler queues up to threads × this many (429 above).
    pub admission_queue_max: usize,
    /// Idle cores steal queued requests from busy ones (`false`: each core
    /// runs only what its own connections asked for).
    pub steal: bool,
    /// Workers that accept connections (the first N; 0 = all). The others
    /// run only work they steal: acceptor cores in front of compute cores.
    pub accept_threads: usize,
    /// Processes serving together (MPI ranks, `mpirun ... serve`): more
    /// than one sizes the outbox of results for other ranks.
    pub ranks: usize,
    /// Soft limit of a connection's pending output; input is not read while
    /// it is exceeded.
    pub send_buffer_bytes: usize,
    /// Provided receive buffers per worker (power of two) and their size.
    pub recv_buffers: u16,
    pub recv_buffer_bytes: u32,
    /// A connection must send HELLO within this time.
    pub handshake_timeout: Duration,
    /// A connection with no open stream and no input for this long is closed.
    pub idle_timeout: Duration,
    /// Bytes of request-driven memory one worker may hold: prompts, and
    /// each connection's output, backlog and frame staging. A REQUEST that
    /// would pass it, or a split frame that would need more staging, gets
    /// ERROR 429 (its payload is discarded unread into memory); capacity
    /// above a small steady size is given back when a buffer empties.
    pub memory_budget_bytes: usize,
    /// A running stream whose produced tokens cannot reach the client (no
    /// credit, or the client does not read) for this long ends with ERROR
    /// 504, and its backend work is freed.
    pub stream_stall_timeout: Duration,
    /// On shutdown, open streams get this long to finish before ERROR 503.
    pub shutdown_grace: Duration,
    /// Required HELLO token, if any.
    pub auth_key: Option<Secret>,
    /// Name sent in HELLO_ACK.
    pub server_name: String,
    /// Time each request's stages and each loop turn ([`stages`]); the
    /// histograms are handed out by [`Server::stage_times`] at exit.
    pub stage_timing: bool,
    /// Workers' rings run completion task work only when the worker waits
    /// (IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN); false asks for a plain
    /// ring, where the kernel interrupts the loop to post completions (an
    /// ablation switch: `--no-defer-taskrun`).
    pub defer_taskrun: bool,
    /// After a turn that handled completions, a worker polls its ring
    /// (zero-timeout turns) for this long before it blocks: requests that
    /// follow within it find the thread running, so neither side pays a
    /// sleep and a wake-up. Zero: block at once.
    pub busy_poll: Duration,
    /// Batched waiting (`cnse_ring::RingConfig::batch_wait`): a worker that
    /// blocks wakes once per window of this length with what came in
    /// during it, instead of once per completion; a completion that finds
    /// the worker idle past its window wakes it at once. Trades up to this
    /// much latency under a steady trickle for fewer wake-ups. Zero: off.
    pub batch_wait: Duration,
    /// How workers receive (an ablation switch; default: the provided-
    /// buffer ring).
    pub recv_mode: RecvMode,
    /// How workers send (an ablation switch; default: plain SEND).
    pub send_mode: SendMode,
    /// Registered send buffers per worker in the fixed send modes (at most
    /// `cnse_ring::FIXED_BUFS_MAX`); a send that finds none free goes out
    /// from the session's buffer.
    pub send_fixed_buffers: u16,
    /// Bytes of each registered send buffer: a send carries at most this
    /// much in the fixed modes (the rest follows in the next send).
    pub send_fixed_bytes: u32,
    /// Stream frames (TOKENS, END, ERROR) one send carries at most; 0: as
    /// many as fit the send buffer (an ablation switch).
    pub frames_per_send_max: usize,
    /// The OpenAI-compatible HTTP front's address (`None`: no HTTP).
    pub http_listen: Option<SocketAddr>,
    /// The model name the HTTP front reports and echoes.
    pub model_name: String,
    /// Names in the model store (`name:tag`), listed by `/v1/models` after
    /// the served model.
    pub store_names: Vec<String>,
    /// A listener that serves only `GET /metrics` and `GET /health`
    /// (Prometheus scraping without the API).
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            threads: 0,
            pin_threads: true,
            join_listen: false,
            payload_bytes_max: PAYLOAD_BYTES_MAX_DEFAULT,
            max_tokens_limit: MAX_TOKENS_LIMIT_DEFAULT,
            conns_per_thread_max: 16_384,
            streams_per_conn_max: 256,
            streams_per_thread_max: 65_536,
            stream_buffered_tokens_max: 256,
            stream_buffered_bytes_max: 16 * 1024,
            admission_queue_max: 4096,
            steal: true,
            accept_threads: 0,
            ranks: 1,
            send_buffer_bytes: 64 * 1024,
            recv_buffers: 1024,
            recv_buffer_bytes: 16 * 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            stream_stall_timeout: Duration::from_secs(30),
            memory_budget_bytes: 1 << 30,
            shutdown_grace: Duration::from_secs(5),
            auth_key: None,
            server_name: format!("cnse-dp {}", env!("CARGO_PKG_VERSION")),
            stage_timing: false,
            defer_taskrun: true,
            busy_poll: Duration::ZERO,
            batch_wait: Duration::ZERO,
            recv_mode: RecvMode::BufRing,
            send_mode: SendMode::Plain,
            send_fixed_buffers: 64,
            send_fixed_bytes: 256 * 1024 + 64,
            frames_per_send_max: 0,
            http_listen: None,
            model_name: "cnse-synthetic".to_string(),
            store_names: Vec::new(),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bind {addr}: {error}")]
    Bind { addr: SocketAddr, error: std::io::Error },
    #[error("io_uring setup: {0} (is io_uring enabled? see /proc/sys/kernel/io_uring_disabled)")]
    Ring(std::io::Error),
    #[error("backend for core {core}: {message}")]
    Backend { core: usize, message: String },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("worker thread {0} panicked")]
    WorkerPanicked(usize),
    #[error("worker thread {thread}: {error}")]
    Worker { thread: usize, error: std::io::Error },
}

/// Live counters of one worker, read by [`Server::stats`].
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub conns_open: AtomicU64,
    pub conns_accepted: AtomicU64,
    pub streams_open: AtomicU64,
    pub backend_active: AtomicU64,
    pub requests: AtomicU64,
    pub tokens_sent: AtomicU64,
    pub tokens_produced: AtomicU64,
    pub backend_paused: AtomicU64,
    pub frames_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub violations: AtomicU64,
    pub rejected: AtomicU64,
    pub ran_local: AtomicU64,
    pub stolen_in: AtomicU64,
    pub stolen_out: AtomicU64,
}

/// A snapshot of all workers' counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub conns_open: u64,
    pub conns_accepted: u64,
    pub streams_open: u64,
    /// Work the backends hold (started, not ended or cancelled).
    pub backend_active: u64,
    pub requests: u64,
    pub tokens_sent: u64,
    /// Tokens the backends handed over (sent, queued or dropped with their
    /// stream).
    pub tokens_produced: u64,
    /// Work the backends hold paused (a stream's queue at its bound).
    pub backend_paused: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub violations: u64,
    pub rejected: u64,
    /// Requests run by the backend of the core that owns their connection.
    pub ran_local: u64,
    /// Requests run by another core's backend (work stealing); the two
    /// are equal for the process, so `Stats` counts `stolen` once.
    pub stolen: u64,
}

pub(crate) struct Shared {
    pub shutdown: AtomicBool,
    pub counters: Vec<WorkerCounters>,
    /// Each worker's request metrics, copied every 100 ms (`/metrics`).
    pub request_metrics: Vec<std::sync::Mutex<metrics::RequestMetrics>>,
    /// Each worker's stage histograms, left here as it exits.
    pub stage_times: std::sync::Mutex<Vec<stages::StageTimes>>,
}

/// A running server. Dropping it without [`Server::shutdown`] detaches the
/// workers.
pub struct Server {
    addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    tasks: Arc<tasks::Tasks>,
    wakers: Vec<worker::Waker>,
    threads: Vec<JoinHandle<Result<(), std::io::Error>>>,
}

impl Server {
    /// Binds one listener per worker and starts the workers. Returns once
    /// every worker is ready to accept.
    pub fn start(mut config: Config, backend: Arc<dyn BackendFactory>) -> Result<Server, ServerError> {
        if config.threads == 0 {
            config.threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        }
        if !config.recv_buffers.is_power_of_two() || config.recv_buffers > 32768 {
            return Err(ServerError::Config(
                "recv buffers must be a power of two <= 32768".into(),
            ));
        }
        if config.stream_buffered_tokens_max == 0 || config.streams_per_conn_max == 0 {
            return Err(ServerError::Config("stream limits must be > 0".into()));
        }
        if config.max_tokens_limit < 1 {
            return Err(ServerError::Config("max tokens limit must be > 0".into()));
        }
        if config.admission_queue_max == 0 {
            return Err(ServerError::Config("admission queue must be > 0".into()));
        }
        let accepting = match config.accept_threads {
            0 => config.threads,
            n => n.min(config.threads),
        };
        let (listeners, addr) = bind_front(Some(config.listen), accepting, config.threads, config.join_listen)?;
        let addr = addr.expect("the binary front is always bound");
        let (http_listeners, http_addr) =
            bind_front(config.http_listen, accepting, config.threads, config.join_listen)?;
        let (metrics_listeners, metrics_addr) =
            bind_front(config.metrics_listen, accepting, config.threads, config.join_listen)?;
        let shared = Arc::new(Shared {
            shutdown: AtomicBool::new(false),
            counters: (0..config.threads).map(|_| WorkerCounters::default()).collect(),
            stage_times: std::sync::Mutex::new(Vec::new()),
            request_metrics: (0..config.threads).map(|_| Default::default()).collect(),
        });
        let mut wakers = Vec::new();
        let mut wake_fds = Vec::new();
        let mut task_fds = Vec::new();
        for _ in 0..config.threads {
            let (waker, wake_fd) = worker::Waker::new().map_err(ServerError::Ring)?;
            task_fds.push(wake_fd.try_clone().map_err(ServerError::Ring)?);
            wakers.push(waker);
            wake_fds.push(wake_fd);
        }
        let balance = if config.steal {
            tasks::Balance::Steal
        } else {
            tasks::Balance::Off
        };
        let queued_max = config.admission_queue_max.saturating_mul(config.threads);
        let remote_max = if config.ranks > 1 { tasks::INBOX_MAX } else { 1 };
        let (tasks, cores) = tasks::Tasks::new(
            config.threads,
            queued_max,
            balance,
            tasks::EventfdWake::new(task_fds),
            remote_max,
        )
        .map_err(|e| ServerError::Config(e.to_string()))?;
        let config = Arc::new(config);
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ServerError>>();
        let fronts = listeners.into_iter().zip(http_listeners).zip(metrics_listeners);
        let per_worker = fronts.zip(wake_fds).zip(cores);
        for (index, ((((listener, http_listener), metrics_listener), wake_fd), core)) in per_worker.enumerate() {
            let tasks = tasks.clone();
            let shared = shared.clone();
            let config = config.clone();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("cnse-worker-{index}"))
                .spawn({
                    let backend = backend.clone();
                    move || {
                        let listeners = worker::Listeners {
                            binary: listener,
                            http: http_listener,
                            metrics: metrics_listener,
                        };
                        let sched = worker::Sched { tasks, core, wake_fd };
                        worker::run(index, config, shared, listeners, sched, backend, ready)
                    }
                })
                .map_err(|error| ServerError::Worker { thread: index, error })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut server = Server {
            addr,
            http_addr,
            metrics_addr,
            shared,
            tasks: tasks.clone(),
            wakers,
            threads,
        };
        for _ in 0..server.threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    server.stop_now();
                    return Err(e);
                }
                Err(_) => {
                    server.stop_now();
                    return Err(ServerError::WorkerPanicked(0));
                }
            }
        }
        Ok(server)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the metrics-only listener is (`Config::metrics_listen`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Where the HTTP front listens (`Config::http_listen`).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// The process's scheduler and the ways back to its cores (the MPI
    /// mirror bridges them to other ranks).
    pub fn tasks(&self) -> &Arc<tasks::Tasks> {
        &self.tasks
    }

    pub fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for c in &self.shared.counters {
            let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
            s.conns_open += r(&c.conns_open);
            s.conns_accepted += r(&c.conns_accepted);
            s.streams_open += r(&c.streams_open);
            s.backend_active += r(&c.backend_active);
            s.requests += r(&c.requests);
            s.tokens_sent += r(&c.tokens_sent);
            s.tokens_produced += r(&c.tokens_produced);
            s.backend_paused += r(&c.backend_paused);
            s.frames_in += r(&c.frames_in);
            s.frames_out += r(&c.frames_out);
            s.violations += r(&c.violations);
            s.rejected += r(&c.rejected);
            s.ran_local += r(&c.ran_local);
            s.stolen += r(&c.stolen_in);
        }
        s
    }

    /// Each worker's (run locally, stolen in, stolen out).
    pub fn steal_counts(&self) -> Vec<(u64, u64, u64)> {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        self.shared
            .counters
            .iter()
            .map(|c| (r(&c.ran_local), r(&c.stolen_in), r(&c.stolen_out)))
            .collect()
    }

    /// Where the workers leave their stage histograms as they exit (with
    /// `Config::stage_timing`): read it after [`Server::shutdown`].
    pub fn stage_times(&self) -> StageTimesHandle {
        StageTimesHandle(self.shared.clone())
    }

    fn stop_now(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            w.wake();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops accepting, lets open streams finish within the grace period
    /// (new REQUESTs get ERROR 503), then closes every connection and joins
    /// the workers.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            w.wake();
        }
        let mut result = Ok(());
        for (i, t) in self.threads.drain(..).enumerate() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(error)) => result = Err(ServerError::Worker { thread: i, error }),
                Err(_) => result = Err(ServerError::WorkerPanicked(i)),
            }
        }
        result
    }
}

/// One front's listeners: `accepting` SO_REUSEPORT sockets on `addr` for
/// the first workers, none for the rest (`threads` entries in all), and
/// the address they are bound to. No address: no listener anywhere.
fn bind_front(
    addr: Option<SocketAddr>,
    accepting: usize,
    threads: usize,
    join: bool,
) -> Result<(Vec<Option<std::os::fd::OwnedFd>>, Option<SocketAddr>), ServerError> {
    let Some(addr) = addr else {
        return Ok(((0..threads).map(|_| None).collect(), None));
    };
    let mut fds: Vec<_> = listen::bind_reuseport(addr, accepting, join)?
        .into_iter()
        .map(Some)
        .collect();
    let bound = listen::local_addr(fds[0].as_ref().expect("at least one worker accepts"))
        .map_err(|error| ServerError::Bind { addr, error })?;
    fds.resize_with(threads, || None);
    Ok((fds, Some(bound)))
}

/// The counters of every worker, read from their published atomics.
pub(crate) fn counters_of(shared: &Shared) -> Vec<session::Counters> {
    let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
    shared
        .counters
        .iter()
        .map(|c| session::Counters {
            streams_open: r(&c.streams_open),
            conns_open: r(&c.conns_open),
            tokens_sent: r(&c.tokens_sent),
            tokens_produced: r(&c.tokens_produced),
            frames_out: r(&c.frames_out),
            frames_in: r(&c.frames_in),
            requests: r(&c.requests),
            violations: r(&c.violations),
            rejected: r(&c.rejected),
            accepted: r(&c.conns_accepted),
            ran_local: r(&c.ran_local),
            stolen_in: r(&c.stolen_in),
            stolen_out: r(&c.stolen_out),
        })
        .collect()
}

/// Reads the stage histograms the workers left at exit.
pub struct StageTimesHandle(Arc<Shared>);

impl StageTimesHandle {
    /// One entry per worker that has exited, in worker order.
    pub fn take(&self) -> Vec<stages::StageTimes> {
        let mut v = std::mem::take(&mut *self.0.stage_times.lock().unwrap_or_else(|e| e.into_inner()));
        v.sort_by_key(|t| t.worker);
        v
    }
}
