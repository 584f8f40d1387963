//! `cnse-dp serve`: start the workers, print the address, serve until
//! SIGINT/SIGTERM, then shut down gracefully.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cnse_backend::BackendFactory;
use cnse_server::{Config, Server};

use crate::gpu_picker::SyntheticDevice;
pub use crate::serve_synthetic::{synthetic_factory, synthetic_factory_on};
use crate::signals::{block_signals, wait_signal};

/// Bounds of `--recv-buffer-bytes`: 1,024 such buffers per worker, so the
/// top is 256 MiB of receive buffers per worker.
const RECV_BUFFER_BYTES_MIN: u32 = 1024;
const RECV_BUFFER_BYTES_MAX: u32 = 256 * 1024;
/// Bounds of `--send-buffer-bytes`.
const SEND_BUFFER_BYTES_MIN: usize = 4096;
const SEND_BUFFER_BYTES_MAX: usize = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendKind {
    /// Embedded synthetic backend (no setup).
    Synthetic,
    /// llama.cpp llama-server over HTTP (`--llama-url`).
    Llama,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Worker threads, one io_uring each (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// Hold the machine's CPU wake-up latency request at N µs while serving
    /// (/dev/cpu_dma_latency, root; 0: idle CPUs poll, docs/ARCHITECTURE.md).
    #[arg(long)]
    pub cpu_dma_latency_us: Option<u32>,
    /// Share the listen addresses with other cnse-dp processes already
    /// serving them (SO_REUSEPORT: the kernel splits new connections among
    /// the processes). Without it a busy address is an error.
    #[arg(long)]
    pub join_listen: bool,
    #[arg(long, value_enum, default_value = "synthetic")]
    pub backend: BackendKind,
    /// File holding the auth key clients must send in HELLO (its content
    /// without a trailing newline).
    #[arg(long)]
    pub auth_key_file: Option<PathBuf>,
    /// Largest accepted frame payload.
    #[arg(long, default_value_t = cnse_server::PAYLOAD_BYTES_MAX_DEFAULT)]
    pub payload_max_bytes: u32,
    /// Largest accepted max_tokens.
    #[arg(long, default_value_t = cnse_server::MAX_TOKENS_LIMIT_DEFAULT)]
    pub max_tokens_limit: u32,
    /// Connections open at once, all worker threads together (each thread
    /// takes an equal share).
    #[arg(long, default_value_t = 16_384)]
    pub max_connections: usize,
    /// Open streams per connection.
    #[arg(long, default_value_t = 256)]
    pub streams_per_conn_max: usize,
    /// Streams per worker thread.
    #[arg(long, default_value_t = 65_536)]
    pub streams_per_thread_max: usize,
    /// Tokens buffered per stream without credit before the backend pauses.
    #[arg(long, default_value_t = 256)]
    pub stream_buffered_tokens_max: usize,
    /// Requests waiting for backend capacity, per worker thread (the
    /// process's scheduler holds threads × this many) before 429.
    #[arg(long, default_value_t = 4096)]
    pub admission_queue_max: usize,
    /// Work stealing: a core with a free backend slot and nothing of its
    /// own queued runs requests queued on busy cores, and sends the tokens
    /// back to the core that owns the client (docs/SCHEDULER.md). `off`:
    /// each core runs only its own connections' requests.
    #[arg(long, value_enum, default_value = "on")]
    pub steal: OnOff,
    /// Only the first N worker threads accept connections (0: all); the
    /// others run work they steal (acceptor cores in front of compute
    /// cores).
    #[arg(long, default_value_t = 0)]
    pub accept_threads: usize,
    /// Synthetic backend: sequences generated at once by the whole process,
    /// like a GPU's batch slots, split evenly over the worker threads;
    /// requests beyond a core's share wait as tasks that idle cores steal.
    /// 0 (default): 65,536 per worker thread, in effect unbounded.
    #[arg(long, default_value_t = 0)]
    pub synthetic_slots: usize,
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    #[arg(long, default_value_t = 300_000)]
    pub idle_timeout_ms: u64,
    #[arg(long, default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,
    /// A stream whose tokens cannot reach the client (no credit, or the
    /// client does not read) for this long ends with ERROR 504 and frees
    /// its backend slot.
    #[arg(long, default_value_t = 30_000)]
    pub stream_stall_timeout_ms: u64,
    /// Request-driven memory the process may hold (prompts; connection
    /// output, backlog and frame staging), split evenly over the worker
    /// threads. A REQUEST beyond it gets ERROR 429.
    #[arg(long, default_value_t = 1024)]
    pub memory_budget_mib: u64,
    /// Synthetic backend: time to first token.
    #[arg(long, default_value_t = 20_000)]
    pub synthetic_ttft_us: u64,
    /// Synthetic backend: time between tokens (0 with ttft 0 = zero-delay capacity mode).
    #[arg(long, default_value_t = 5_000)]
    pub synthetic_token_interval_us: u64,
    /// Synthetic backend: how tokens are chosen — `cpu` (hash, default),
    /// `cpu-sampler` (softmax/top-k/top-p/seeded sampling over generated
    /// logits on the CPU) or `cuda[:N]` (the same sampling on GPU N, batched
    /// across streams).
    #[arg(long, default_value = "cpu")]
    pub synthetic_device: SyntheticDevice,
    /// Synthetic backend: vocabulary size of the generated logit rows
    /// (sampling devices only; up to 262,144).
    #[arg(long, default_value_t = 32_768)]
    pub synthetic_vocab: u32,
    /// llama-server base URLs, comma separated (http://host:port).
    #[arg(long, value_delimiter = ',')]
    pub llama_url: Vec<String>,
    /// Requests in flight per llama-server, all worker threads together
    /// (match its `-np` slots; more wait in the admission queue).
    #[arg(long, default_value_t = 4)]
    pub llama_inflight: usize,
    /// How a stream picks its llama-server: least-outstanding (fewest in
    /// flight), prefix (the server whose KV cache holds the longest prefix
    /// of the prompt, on that slot; docs/LLAMA.md "Cache-aware routing"),
    /// or session (a request with a session key goes to the server its key
    /// is pinned to while healthy and not too loaded; others as prefix).
    #[arg(long, default_value = "prefix")]
    pub llama_route: cnse_llama::Route,
    /// Prefix routing gives way to the least-loaded server when the
    /// prefix server's (in flight + 1) exceeds this factor times the
    /// least-loaded one's.
    #[arg(long, default_value_t = 2.0)]
    pub llama_prefix_load_factor: f32,
    /// Entries of each llama-server's prefix index (12 bytes each; one
    /// entry per 32 prompt bytes sent; least recently used evicted).
    #[arg(long, default_value_t = cnse_llama::prefix::ENTRIES_DEFAULT)]
    pub llama_prefix_entries: usize,
    /// Entries of the session table of --llama-route session (12 bytes
    /// each, one per session key, all servers together; least recently
    /// used evicted within a 4-way bucket).
    #[arg(long, default_value_t = cnse_llama::session::ENTRIES_DEFAULT)]
    pub llama_session_entries: usize,
    /// A stream that fails before its first token (connection refused,
    /// HTTP 5xx or 429) is sent to another llama-server up to this many
    /// times, unseen by the client (0: never).
    #[arg(long, default_value_t = 2)]
    pub llama_retries: u8,
    /// A stream whose llama-server dies after tokens were sent continues
    /// on another llama-server from its text so far (prompt + generated
    /// text, same sampling, fewer tokens left), within --llama-retries
    /// moves; its END is marked for clients that ask (docs/PROTOCOL.md).
    /// `off`: it ends with ERROR 502.
    #[arg(long, value_enum, default_value = "on")]
    pub llama_failover: OnOff,
    /// Idle connections per llama-server per worker kept connected ahead
    /// of requests (llama-server closes after every stream: a request then
    /// finds a connected socket); at most --llama-inflight (the default),
    /// 0: none. Over the process, a server gets no more spares than its
    /// free places + 1 and --llama-spares-max: each holds one of its HTTP
    /// threads while idle.
    #[arg(long)]
    pub llama_spare_conns: Option<usize>,
    /// Spare connections per llama-server over all workers together (0:
    /// none), beside the free-places rule above.
    #[arg(long, default_value_t = cnse_llama::SPARES_MAX_DEFAULT)]
    pub llama_spares_max: usize,
    /// Print a stats line every N ms (0: never).
    #[arg(long, default_value_t = 0)]
    pub stats_interval_ms: u64,
    /// Time every request's stages inside the loop (recv→parse,
    /// parse→backend, backend→end, end→submit) and every loop turn; print
    /// the table per worker at exit (docs/BENCHMARKS.md, "where the tail
    /// goes"). Costs a few clock reads per request.
    #[arg(long)]
    pub stage_timing: bool,
    /// After a turn with work, a worker polls its ring for this many µs
    /// before it sleeps: traffic that keeps coming finds it awake, and
    /// neither side pays a sleep and a wake-up (0: sleep at once).
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
    /// Batched waiting (Linux 6.12 or later): a worker that blocks wakes
    /// once per window of this many µs with every completion that came in
    /// during it, instead of once per completion; one that finds the worker
    /// idle past its window still wakes it at once. Fewer wake-ups and
    /// enters per streamed token for up to this much added latency under a
    /// steady trickle (docs/ARCHITECTURE.md, "Batched waiting"). 0: off.
    #[arg(long, default_value_t = 0)]
    pub batch_wait_us: u64,
    /// Size of each provided receive buffer (1,024 per worker), bytes: one
    /// recv completion carries at most this much (an ablation switch).
    #[arg(long, default_value_t = 16 * 1024)]
    pub recv_buffer_bytes: u32,
    /// Soft limit of a connection's pending output, bytes: input is not
    /// read while it is exceeded (an ablation switch).
    #[arg(long, default_value_t = 64 * 1024)]
    pub send_buffer_bytes: usize,
    /// Plain rings: completion task work runs when the kernel posts it,
    /// interrupting the loop, instead of only when a worker waits
    /// (DEFER_TASKRUN off; an ablation switch).
    #[arg(long)]
    pub no_defer_taskrun: bool,
    /// How workers receive: `bufring` (multishot RECV from a provided-
    /// buffer ring) or `plain` (one RECV at a time into each connection's
    /// own buffer); an ablation switch.
    #[arg(long, value_enum, default_value = "bufring")]
    pub recv_mode: RecvModeArg,
    /// How workers send: `plain` (SEND), `zc` (SEND_ZC, zero-copy),
    /// `fixed` (SEND from a registered buffer, Linux 6.10) or `zc-fixed`
    /// (SEND_ZC from a registered buffer); an ablation switch.
    #[arg(long, value_enum, default_value = "plain")]
    pub send_mode: SendModeArg,
    /// Registered send buffers per worker for `--send-mode fixed|zc-fixed`
    /// (1..=4096; a send that finds none free goes out unregistered).
    #[arg(long, default_value_t = 64)]
    pub send_fixed_buffers: u16,
    /// Bytes of each registered send buffer (4096..=16 MiB): the most one
    /// send carries in the fixed modes (default: a 256 KiB payload and its
    /// header).
    #[arg(long, default_value_t = 256 * 1024 + 64)]
    pub send_fixed_bytes: u32,
    /// Stream frames one send carries at most (0: as many as fit
    /// --send-buffer-bytes); an ablation switch.
    #[arg(long, default_value_t = 0)]
    pub max_frames_per_send: usize,
    /// Also serve the OpenAI-compatible HTTP API here (docs/HTTP.md):
    /// /v1/completions, /v1/chat/completions, /v1/models, /health,
    /// /metrics, on the same worker rings.
    #[arg(long)]
    pub http_listen: Option<std::net::SocketAddr>,
    /// Serve only `GET /metrics` and `GET /health` here (Prometheus
    /// scraping without exposing the API).
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// A model store whose names (`name:tag`) the HTTP API's `/v1/models`
    /// lists after the served model.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The model name the HTTP API reports (`/v1/models`, `model` fields);
    /// with the llama backend, by default what llama-server lists.
    #[arg(long, default_value = MODEL_NAME_DEFAULT)]
    pub model_name: String,
}

/// The HTTP front's model name: `--model-name`, or with the llama backend
/// and no name given, what the first llama-server lists.
fn model_name(a: &Args) -> String {
    if a.model_name == MODEL_NAME_DEFAULT && matches!(a.backend, BackendKind::Llama) {
        if let Some(m) = crate::serve_llama::served_model_name(a) {
            return m;
        }
    }
    a.model_name.clone()
}

const MODEL_NAME_DEFAULT: &str = "cnse-synthetic";

/// The names in `--store`, sorted (none without it).
fn store_names(a: &Args) -> anyhow::Result<Vec<String>> {
    let Some(dir) = &a.store else {
        return Ok(Vec::new());
    };
    let store = cnse_store::Store::open(dir).with_context(|| format!("--store {}", dir.display()))?;
    let refs = store
        .refs()
        .with_context(|| format!("listing the names in {}", dir.display()))?;
    Ok(refs.into_iter().map(|r| r.name.to_string()).collect())
}

/// The server's key: the file as `key_file` reads it (refused when group
/// or others can read or write it), never empty.
pub fn read_auth_key(path: &std::path::Path) -> anyhow::Result<cnse_server::Secret> {
    let key = crate::key_file::read_key_file(path)?;
    if key.is_empty() {
        bail!("auth key file {} is empty", path.display());
    }
    Ok(cnse_server::Secret::new(key))
}

pub fn config(a: &Args) -> anyhow::Result<Config> {
    let auth_key = a.auth_key_file.as_deref().map(read_auth_key).transpose()?;
    let threads = match a.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    if a.memory_budget_mib == 0 {
        bail!("--memory-budget-mib must be at least 1");
    }
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if a.admission_queue_max == 0 {
        bail!("--admission-queue-max must be at least 1");
    }
    if a.synthetic_slots != 0 && a.synthetic_slots < threads {
        bail!(
            "--synthetic-slots {} leaves a worker thread without a slot: give at least --threads ({threads})",
            a.synthetic_slots
        );
    }
    if a.accept_threads > threads {
        bail!(
            "--accept-threads {} is more than --threads ({threads})",
            a.accept_threads
        );
    }
    if !(RECV_BUFFER_BYTES_MIN..=RECV_BUFFER_BYTES_MAX).contains(&a.recv_buffer_bytes) {
        bail!("--recv-buffer-bytes must be in {RECV_BUFFER_BYTES_MIN}..={RECV_BUFFER_BYTES_MAX}");
    }
    if !(1..=cnse_ring::FIXED_BUFS_MAX).contains(&a.send_fixed_buffers) {
        bail!("--send-fixed-buffers must be in 1..={}", cnse_ring::FIXED_BUFS_MAX);
    }
    if !(4096..=16 << 20).contains(&a.send_fixed_bytes) {
        bail!("--send-fixed-bytes must be in 4096..={}", 16 << 20);
    }
    if !(SEND_BUFFER_BYTES_MIN..=SEND_BUFFER_BYTES_MAX).contains(&a.send_buffer_bytes) {
        bail!("--send-buffer-bytes must be in {SEND_BUFFER_BYTES_MIN}..={SEND_BUFFER_BYTES_MAX}");
    }
    Ok(Config {
        listen: a.listen,
        threads,
        pin_threads: !a.no_pin,
        join_listen: a.join_listen,
        payload_bytes_max: a.payload_max_bytes,
        max_tokens_limit: a.max_tokens_limit,
        conns_per_thread_max: a.max_connections.div_ceil(threads).max(1),
        streams_per_conn_max: a.streams_per_conn_max,
        streams_per_thread_max: a.streams_per_thread_max,
        stream_buffered_tokens_max: a.stream_buffered_tokens_max,
        admission_queue_max: a.admission_queue_max,
        steal: a.steal == OnOff::On,
        accept_threads: a.accept_threads,
        handshake_timeout: Duration::from_millis(a.handshake_timeout_ms),
        idle_timeout: Duration::from_millis(a.idle_timeout_ms),
        stream_stall_timeout: Duration::from_millis(a.stream_stall_timeout_ms),
        memory_budget_bytes: usize::try_from((a.memory_budget_mib << 20) / threads as u64).unwrap_or(usize::MAX),
        shutdown_grace: Duration::from_millis(a.shutdown_grace_ms),
        auth_key,
        stage_timing: a.stage_timing,
        busy_poll: Duration::from_micros(a.busy_poll_us),
        batch_wait: Duration::from_micros(a.batch_wait_us),
        recv_buffer_bytes: a.recv_buffer_bytes,
        send_buffer_bytes: a.send_buffer_bytes,
        defer_taskrun: !a.no_defer_taskrun,
        recv_mode: match a.recv_mode {
            RecvModeArg::Bufring => cnse_server::RecvMode::BufRing,
            RecvModeArg::Plain => cnse_server::RecvMode::Plain,
        },
        send_mode: match a.send_mode {
            SendModeArg::Plain => cnse_server::SendMode::Plain,
            SendModeArg::Zc => cnse_server::SendMode::Zc,
            SendModeArg::Fixed => cnse_server::SendMode::Fixed,
            SendModeArg::ZcFixed => cnse_server::SendMode::ZcFixed,
        },
        send_fixed_buffers: a.send_fixed_buffers,
        send_fixed_bytes: a.send_fixed_bytes,
        frames_per_send_max: a.max_frames_per_send,
        http_listen: a.http_listen,
        metrics_listen: a.metrics_listen,
        store_names: store_names(a)?,
        model_name: model_name(a),
        ..Config::default()
    })
}

/// `--recv-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RecvModeArg {
    Bufring,
    Plain,
}

/// `--send-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SendModeArg {
    Plain,
    Zc,
    Fixed,
    ZcFixed,
}

fn backend(a: &Args, threads: usize) -> anyhow::Result<Arc<dyn BackendFactory>> {
    match a.backend {
        BackendKind::Synthetic => synthetic_factory_on(
            a.synthetic_ttft_us,
            a.synthetic_token_interval_us,
            a.synthetic_device,
            a.synthetic_vocab,
            (a.synthetic_slots, threads),
        ),
        BackendKind::Llama => crate::serve_llama::llama_factory(a),
    }
}

/// Under `mpirun`: this rank's ports and backends (`serve_ranks`).
fn for_rank(a: &mut Args, p: crate::serve_ranks::Place) -> anyhow::Result<()> {
    use crate::serve_ranks::{shifted, urls_for};
    if !cfg!(feature = "mpi") {
        bail!(
            "started as rank {} of {} by an MPI launcher, but this cnse-dp was built without MPI: build it with --features mpi",
            p.rank,
            p.ranks
        );
    }
    if a.steal == OnOff::Off {
        bail!("--steal off cannot run the requests other ranks send: leave stealing on under mpirun");
    }
    a.listen = shifted(a.listen, p.rank)?;
    a.http_listen = a.http_listen.map(|h| shifted(h, p.rank)).transpose()?;
    a.metrics_listen = a.metrics_listen.map(|m| shifted(m, p.rank)).transpose()?;
    a.llama_url = urls_for(&a.llama_url, p.rank)?;
    Ok(())
}

/// Backend sequences of this process at once (the MPI mirror's slots).
fn slots_of(a: &Args, threads: usize) -> usize {
    match a.backend {
        BackendKind::Synthetic if a.synthetic_slots > 0 => a.synthetic_slots,
        BackendKind::Synthetic => threads * 65_536,
        BackendKind::Llama => a.llama_inflight * a.llama_url.len().max(1),
    }
}

pub fn run(mut a: Args) -> anyhow::Result<()> {
    let place = crate::serve_ranks::place();
    if let Some(p) = place {
        for_rank(&mut a, p)?;
    }
    let _latency = crate::cpu_latency::hold(a.cpu_dma_latency_us)?;
    let mut cfg = config(&a)?;
    cfg.ranks = place.map_or(1, |p| p.ranks);
    let factory = backend(&a, cfg.threads)?;
    let threads = cfg.threads;
    let signals = block_signals();
    let server = Server::start(cfg, factory).context("starting the server")?;
    #[cfg(feature = "mpi")]
    let mirror = match place {
        Some(p) => Some(crate::serve_ranks::RankMirror::start(
            &server,
            slots_of(&a, threads),
            p.rank,
        )?),
        None => None,
    };
    #[cfg(not(feature = "mpi"))]
    let _ = (slots_of(&a, threads), place);
    let rank_prefix = place.map(|p| format!("rank {} ", p.rank)).unwrap_or_default();
    println!("{rank_prefix}listening on {}", server.local_addr());
    if let Some(p) = place {
        println!("rank {} pid {}", p.rank, std::process::id());
    }
    if let Some(h) = server.http_addr() {
        println!("http listening on {h}");
    }
    if let Some(m) = server.metrics_addr() {
        println!("metrics listening on {m}");
    }
    tracing::info!(
        listen = %server.local_addr(),
        http = ?server.http_addr(),
        workers = server.threads(),
        backend = ?a.backend,
        max_connections = a.max_connections,
        memory_budget_mib = a.memory_budget_mib,
        auth = a.auth_key_file.is_some(),
        "cnse-dp serving"
    );
    use std::io::Write;
    std::io::stdout().flush().ok();
    let tick = if a.stats_interval_ms > 0 {
        Duration::from_millis(a.stats_interval_ms)
    } else {
        Duration::from_secs(3600)
    };
    loop {
        if wait_signal(&signals, tick) {
            break;
        }
        if a.stats_interval_ms > 0 {
            let s = server.stats();
            #[cfg(feature = "mpi")]
            if let Some(m) = &mirror {
                use std::sync::atomic::Ordering::Relaxed;
                let stolen_in = m.stats.stolen_in.load(Relaxed);
                // This rank's own requests run here: everything its cores
                // started, less what other ranks sent.
                println!(
                    "rank {} tasks ran_local={} stolen_in={} stolen_out={} lost={}",
                    m.rank(),
                    (s.ran_local + s.stolen).saturating_sub(stolen_in),
                    stolen_in,
                    m.stats.stolen_out.load(Relaxed),
                    m.stats.lost_tasks.load(Relaxed)
                );
            }
            println!(
                "{rank_prefix}stats conns={} accepted={} streams={} active={} paused={} requests={} tokens={} produced={} frames_in={} frames_out={} violations={} rejected={} ran_local={} stolen={} allocs={}",
                s.conns_open,
                s.conns_accepted,
                s.streams_open,
                s.backend_active,
                s.backend_paused,
                s.requests,
                s.tokens_sent,
                s.tokens_produced,
                s.frames_in,
                s.frames_out,
                s.violations,
                s.rejected,
                s.ran_local,
                s.stolen,
                crate::alloc_count::allocations()
            );
            if server.threads() > 1 {
                // Per worker: run locally / stolen in / stolen out.
                let per: Vec<String> = server
                    .steal_counts()
                    .iter()
                    .enumerate()
                    .map(|(i, (l, i_n, o))| format!("w{i}={l}/{i_n}/{o}"))
                    .collect();
                println!("steals local/in/out {}", per.join(" "));
            }
            std::io::stdout().flush().ok();
        }
    }
    tracing::info!("shutting down: open streams get --shutdown-grace-ms to finish");
    let stages = server.stage_times();
    server.shutdown().context("shutting down")?;
    if let Some(p) = place {
        println!("rank {} drained and stopped", p.rank);
        std::io::stdout().flush().ok();
    }
    #[cfg(feature = "mpi")]
    if let Some(m) = mirror {
        // MPI_Finalize needs the launcher: when mpirun itself was told to
        // end the job (SIGTERM to mpirun), it may be gone already and the
        // call never returns. The streams are drained: leave without it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            m.shutdown();
            let _ = tx.send(());
        });
        if rx.recv_timeout(Duration::from_secs(2)).is_err() {
            eprintln!("MPI_Finalize did not return within 2 s (mpirun gone?): exiting without it");
            std::process::exit(0);
        }
    }
    if a.stage_timing {
        for t in stages.take() {
            println!("stage timing, worker {}:\n{}", t.worker, t.render());
        }
    }
    Ok(())
}
