//! The load generator: `connections` × `inflight` streams over io_uring.
//!
//! Each client thread owns a share of the connections and one ring. A
//! connection has one `recv` and at most one `send` in flight; frames built
//! while a send is in flight go to a second buffer that is sent next (so a
//! turn's frames leave in one send). Every buffer, slot and histogram is
//! allocated before the measured run: the steady state allocates nothing
//! per frame.
//!
//! Timing. Closed loop: each slot re-issues as soon as its request ends, and
//! latency is measured from the send. Open loop: request `i` of a thread is
//! *intended* at `start + i / rate`; it is sent then, or as soon as a slot is
//! free if all are busy, and every latency is measured from the intended
//! time. A server that stalls therefore shows the stall in the percentiles
//! instead of slowing the client down (coordinated omission corrected by
//! the schedule). Requests intended during the warm-up are not recorded;
//! rates count events inside the measured window only.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use cnse_metrics::{LatencyHistogram, Rate, Summary};
use cnse_proto::{put_credit, put_ping, put_request, Direction, FrameDecoder, Kind, Params, HEADER_BYTES};
use io_uring::{opcode, types, IoUring};

use crate::{Client, ClientError, CLIENT_PAYLOAD_BYTES_MAX};

/// Most streams in flight per connection (slot index lives in 16 bits of
/// the stream id).
pub const INFLIGHT_MAX: usize = 4096;
/// Most connections per run.
pub const CONNECTIONS_MAX: usize = 100_000;
/// Default of [`LoadConfig::open_loop_tick`].
pub const OPEN_LOOP_TICK_US_DEFAULT: u64 = 100;
const RECV_BUFFER_BYTES: usize = 64 << 10;
const SLOT_BITS: u32 = 16;
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
/// Bound on how long shutdown waits for the kernel to hand back buffers.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

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
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Ping { .. } => "ping",
            Mode::Generate { .. } => "generate",
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
            server_pid: None,
            allocation_counter: None,
            requests: None,
        }
    }

    fn check(&self) -> Result<(), ClientError> {
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
            Mode::Generate { max_tokens: 0, .. } => bad("max_tokens must be > 0".to_string()),
            _ => Ok(()),
        }
    }
}

/// What a run measured, merged over threads.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub mode: &'static str,
    pub connections: usize,
    pub inflight: usize,
    pub threads: usize,
    pub rate_per_s: Option<f64>,
    /// Length of the measured window.
    pub window: Duration,
    /// Time to first token (generate).
    pub ttft: LatencyHistogram,
    /// Gap before each token: the first token of a TOKENS frame gets the
    /// time since the previous frame of its stream, tokens packed with it
    /// get 0 (they arrived together).
    pub inter_token: LatencyHistogram,
    /// REQUEST (or PING) to END (or PONG).
    pub e2e: LatencyHistogram,
    /// Streams completed successfully inside the window.
    pub requests: u64,
    pub tokens: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// ERROR frames by code.
    pub errors: BTreeMap<u32, u64>,
    /// Connections the server closed or that failed during the run.
    pub connections_lost: u64,
    /// Frames that broke the protocol (bad header, unknown or ended stream,
    /// tokens beyond the credit granted, a token index or count different
    /// from what arrived, PONG not echoed byte for byte).
    pub bad_frames: u64,
    /// Open loop: requests due by the end that no free slot could send.
    pub unsent: u64,
    /// Streams still open when the drain timeout ran out.
    pub unfinished: u64,
    /// CPU time of the server process (`server_pid`) during the window.
    pub server_cpu: Option<Duration>,
    /// CPU time of this process (all client threads) during the window.
    pub client_cpu: Option<Duration>,
    /// Time the server's and the client's threads spent runnable but
    /// waiting for a CPU during the window (from schedstat): on a shared
    /// machine, what the other tenants took.
    pub server_runq_wait: Option<Duration>,
    pub client_runq_wait: Option<Duration>,
    /// Heap allocations of this process during the window (with
    /// `allocation_counter`).
    pub allocations: Option<u64>,
}

impl LoadReport {
    fn absorb(&mut self, s: &ThreadStats) -> Result<(), ClientError> {
        let merge =
            |a: &mut LatencyHistogram, b: &LatencyHistogram| a.merge(b).map_err(|e| ClientError::Load(e.to_string()));
        merge(&mut self.ttft, &s.ttft)?;
        merge(&mut self.inter_token, &s.inter_token)?;
        merge(&mut self.e2e, &s.e2e)?;
        self.requests += s.requests;
        self.tokens += s.tokens;
        self.frames_in += s.frames_in;
        self.frames_out += s.frames_out;
        for (code, n) in &s.errors {
            *self.errors.entry(*code).or_default() += n;
        }
        self.connections_lost += s.connections_lost;
        self.bad_frames += s.bad_frames;
        self.unsent += s.unsent;
        self.unfinished += s.unfinished;
        Ok(())
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Latency rows for the table/CSV (TTFT and inter-token only when
    /// generating).
    pub fn summaries(&self) -> Vec<Summary> {
        let mut v = Vec::with_capacity(3);
        if self.mode == "generate" {
            v.push(self.ttft.summary("ttft"));
            v.push(self.inter_token.summary("inter_token"));
        }
        v.push(self.e2e.summary("e2e"));
        v
    }

    pub fn rates(&self) -> Vec<Rate> {
        let w = self.window;
        let mut v = vec![Rate::new("requests", self.requests, w)];
        if self.mode == "generate" {
            v.push(Rate::new("tokens", self.tokens, w));
        }
        v.push(Rate::new("frames_in", self.frames_in, w));
        v.push(Rate::new("frames_out", self.frames_out, w));
        v
    }

    /// Throughput per CPU-second of the server process, when it was
    /// measured: `requests_per_server_cpu_s` and `tokens_per_server_cpu_s`.
    pub fn cpu_rates(&self) -> Vec<Rate> {
        let Some(cpu) = self.server_cpu else {
            return Vec::new();
        };
        let mut v = vec![Rate::new("requests_per_server_cpu_s", self.requests, cpu)];
        if self.mode == "generate" {
            v.push(Rate::new("tokens_per_server_cpu_s", self.tokens, cpu));
        }
        v
    }

    pub fn requests_per_s(&self) -> f64 {
        Rate::new("", self.requests, self.window).per_s()
    }

    /// One line of problems, or `None` when the run was clean.
    pub fn problems(&self) -> Option<String> {
        let mut parts = Vec::new();
        for (code, n) in &self.errors {
            parts.push(format!("{n} x ERROR {code}"));
        }
        for (n, what) in [
            (self.connections_lost, "connections lost"),
            (self.bad_frames, "bad frames"),
            (
                self.unsent,
                "requests never sent (no free slot: offered rate above capacity; percentiles understate)",
            ),
            (self.unfinished, "streams unfinished at the drain timeout"),
        ] {
            if n > 0 {
                parts.push(format!("{n} {what}"));
            }
        }
        (!parts.is_empty()).then(|| parts.join(", "))
    }

    /// A label for the CSV `run` column.
    pub fn label(&self) -> String {
        let shape = match self.rate_per_s {
            Some(r) => format!("open {r:.0}/s"),
            None => "closed".to_string(),
        };
        format!(
            "{} c={} k={} t={} {shape}",
            self.mode, self.connections, self.inflight, self.threads
        )
    }
}

/// Runs the load and returns the merged report.
pub fn run(cfg: &LoadConfig) -> Result<LoadReport, ClientError> {
    cfg.check()?;
    // The caller's thread joins the barrier to time the CPU samples.
    let barrier = Arc::new(Barrier::new(cfg.threads + 1));
    let mut handles = Vec::with_capacity(cfg.threads);
    for t in 0..cfg.threads {
        // Connections spread evenly: the first `rem` threads take one more.
        let (base, rem) = (cfg.connections / cfg.threads, cfg.connections % cfg.threads);
        let conns = base + usize::from(t < rem);
        let cfg = cfg.clone();
        let barrier = barrier.clone();
        let h = std::thread::Builder::new()
            .name(format!("cnse-load-{t}"))
            .spawn(move || worker(t, conns, &cfg, &barrier))
            .map_err(|e| ClientError::Load(format!("spawning client thread: {e}")))?;
        handles.push(h);
    }
    let mut report = LoadReport {
        mode: cfg.mode.name(),
        connections: cfg.connections,
        inflight: cfg.inflight,
        threads: cfg.threads,
        rate_per_s: cfg.rate_per_s,
        // Request-bound runs take the longest thread's window (below).
        window: if cfg.requests.is_some() {
            Duration::ZERO
        } else {
            cfg.duration
        },
        ..Default::default()
    };
    barrier.wait();
    let server_clock = cfg.server_pid.and_then(cpu_clock_of);
    std::thread::sleep(cfg.warmup);
    let own_pid = std::process::id();
    let start = (server_clock.map(cpu_time), cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID));
    let wait_start = (cfg.server_pid.and_then(runq_wait), runq_wait(own_pid));
    // Sampled innermost: reading /proc above allocates.
    let allocs_start = cfg.allocation_counter.map(|f| f());
    // Until the window ends, or sooner when a request bound ended the run.
    let window_end = Instant::now() + cfg.duration;
    while Instant::now() < window_end && !handles.iter().all(|h| h.is_finished()) {
        std::thread::sleep(Duration::from_millis(10).min(window_end.saturating_duration_since(Instant::now())));
    }
    let allocs_end = cfg.allocation_counter.map(|f| f());
    let end = (server_clock.map(cpu_time), cpu_time(libc::CLOCK_PROCESS_CPUTIME_ID));
    let wait_end = (cfg.server_pid.and_then(runq_wait), runq_wait(own_pid));
    if let (Some(a), Some(b)) = (allocs_start, allocs_end) {
        report.allocations = Some(b.saturating_sub(a));
    }
    if let (Some(a), Some(b)) = (wait_start.0, wait_end.0) {
        report.server_runq_wait = Some(b.saturating_sub(a));
    }
    if let (Some(a), Some(b)) = (wait_start.1, wait_end.1) {
        report.client_runq_wait = Some(b.saturating_sub(a));
    }
    if let (Some(Some(a)), Some(Some(b))) = (start.0, end.0) {
        report.server_cpu = Some(b.saturating_sub(a));
    }
    if let (Some(a), Some(b)) = (start.1, end.1) {
        report.client_cpu = Some(b.saturating_sub(a));
    }
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(stats)) => {
                if cfg.requests.is_some() {
                    report.window = report.window.max(Duration::from_nanos(stats.window_ns));
                }
                report.absorb(&stats)?
            }
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(ClientError::Load("a client thread panicked".to_string()));
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The CPU-time clock of another process.
fn cpu_clock_of(pid: u32) -> Option<libc::clockid_t> {
    let mut id: libc::clockid_t = 0;
    // SAFETY: writes one clockid_t we own.
    let r = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut id) };
    (r == 0).then_some(id)
}

fn cpu_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    (r == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// Sum over a process's threads of the time spent waiting on a run queue
/// (second field of /proc/PID/task/TID/schedstat, ns). Threads that exit
/// in between make the difference approximate; the load's threads and the
/// server's workers live for the whole window.
fn runq_wait(pid: u32) -> Option<Duration> {
    let mut total_ns = 0u64;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = task.ok()?.path().join("schedstat");
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        total_ns += text.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok())?;
    }
    Some(Duration::from_nanos(total_ns))
}

#[derive(Default)]
struct ThreadStats {
    /// Length of this thread's measured window.
    window_ns: u64,
    /// When the last measured request ended.
    last_done_ns: u64,
    ttft: LatencyHistogram,
    inter_token: LatencyHistogram,
    e2e: LatencyHistogram,
    requests: u64,
    tokens: u64,
    frames_in: u64,
    frames_out: u64,
    errors: BTreeMap<u32, u64>,
    connections_lost: u64,
    bad_frames: u64,
    unsent: u64,
    unfinished: u64,
}

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    /// Counted in the histograms (intended after the warm-up).
    recorded: bool,
    generation: u64,
    /// When the request was meant to go out (open loop) or went out.
    intended_ns: u64,
    /// Arrival of the previous TOKENS frame.
    last_ns: u64,
    tokens: u64,
    /// Tokens received since credit was last granted.
    unacked: u32,
    /// Credit granted so far (initial plus CREDIT frames); 0 = unlimited.
    granted: u64,
}

struct Conn {
    /// Owns the fd (closed on drop, after `shut_down`).
    _sock: std::net::TcpStream,
    fd: RawFd,
    rbuf: Box<[u8]>,
    decoder: FrameDecoder,
    /// Frames handed to the kernel; untouched until the send completes.
    wire: Vec<u8>,
    wire_off: usize,
    sending: bool,
    receiving: bool,
    queued: bool,
    /// Split from the receive side so frames decoded in place from `rbuf`
    /// can be handled while `st` is borrowed mutably.
    st: Streams,
}

struct Streams {
    fd: RawFd,
    /// Open loop: idle slots (a stack, preallocated to `inflight`).
    free: Vec<u32>,
    /// In the loop's `ready` queue.
    ready: bool,
    /// Frames being built this turn.
    out: Vec<u8>,
    alive: bool,
    busy: usize,
    slots: Box<[Slot]>,
}

/// Run phases as nanoseconds since the thread's clock origin.
#[derive(Clone, Copy)]
struct Phase {
    measure_from_ns: u64,
    end_ns: u64,
}

impl Phase {
    fn in_window(&self, t_ns: u64) -> bool {
        t_ns >= self.measure_from_ns && t_ns < self.end_ns
    }
}

/// What frame handling asks of the loop.
struct Ctx<'a> {
    stats: &'a mut ThreadStats,
    /// Open loop: connections with a free slot, each at most once.
    ready: &'a mut VecDeque<u32>,
    mode: &'a Mode,
    ping_payload: &'a [u8],
    phase: Phase,
    closed_loop: bool,
    stopping: bool,
    /// Measured requests this thread may still issue.
    quota: &'a mut u64,
}

fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it and
    // sched_setaffinity(0) only reads it for the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        // Pinning is an optimisation; an invalid CPU leaves the thread free.
        let _ = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn worker(t: usize, conns_n: usize, cfg: &LoadConfig, barrier: &Barrier) -> Result<ThreadStats, ClientError> {
    if !cfg.cpus.is_empty() {
        pin_to(cfg.cpus[t % cfg.cpus.len()]);
    }
    let setup = setup(conns_n, cfg);
    // Every thread reaches the barrier, failed or not, so none waits forever.
    barrier.wait();
    let (mut ring, mut conns) = setup?;
    let clock = Instant::now();
    let now_ns = || clock.elapsed().as_nanos() as u64;
    let warmup_ns = cfg.warmup.as_nanos() as u64;
    let phase = Phase {
        measure_from_ns: warmup_ns,
        end_ns: warmup_ns + cfg.duration.as_nanos() as u64,
    };
    let drain_end_ns = phase.end_ns + cfg.drain_timeout.as_nanos() as u64;
    let ping_payload: Box<[u8]> = match cfg.mode {
        Mode::Ping { payload_bytes } => (0..payload_bytes).map(|i| (i * 31 + 7) as u8).collect(),
        Mode::Generate { .. } => Box::new([]),
    };
    let mut stats = ThreadStats::default();
    let mut ready: VecDeque<u32> = VecDeque::with_capacity(conns_n);
    let mut dirty: Vec<u32> = Vec::with_capacity(conns_n);
    let mut completions: Vec<(u64, i32)> = Vec::with_capacity(ring.params().cq_entries() as usize);
    // Open loop schedule of this thread: evenly spaced, threads interleaved.
    let interval_ns = cfg.rate_per_s.map(|r| (1e9 * cfg.threads as f64 / r).max(1.0));
    let offset_ns = interval_ns.map_or(0.0, |i| i * t as f64 / cfg.threads as f64);
    let mut next_index: u64 = 0;
    let tick_ns = cfg.open_loop_tick.as_nanos() as u64;
    // Closed loop: slot number `i` of this thread starts at ramp_at(i).
    let slots_n = (conns_n * cfg.inflight) as u64;
    let ramp_at = |i: u64| phase.measure_from_ns * i / slots_n;
    let mut started: u64 = 0;

    for (c, conn) in conns.iter_mut().enumerate() {
        arm_recv(&mut ring, conn, c)?;
        conn.st.ready = true;
        ready.push_back(c as u32);
        for s in (0..cfg.inflight).rev() {
            conn.st.free.push(s as u32);
        }
    }
    let mut quota = cfg.requests.map_or(u64::MAX, |n| {
        let (base, rem) = (n / cfg.threads as u64, n % cfg.threads as u64);
        base + u64::from((t as u64) < rem)
    });
    let mut stopping = false;
    loop {
        let now = now_ns();
        let mut ctx = Ctx {
            stats: &mut stats,
            ready: &mut ready,
            mode: &cfg.mode,
            ping_payload: &ping_payload,
            phase,
            closed_loop: interval_ns.is_none(),
            stopping,
            quota: &mut quota,
        };
        if !stopping {
            match interval_ns {
                None => {
                    // Closed loop: start every slot once, spread evenly over
                    // the warm-up so that streams do not run in lockstep
                    // waves; completions re-issue from then on.
                    while let Some(&c) = ctx.ready.front() {
                        if ramp_at(started) > now {
                            break;
                        }
                        let conn = &mut conns[c as usize];
                        let slot = conn.st.free.pop();
                        if conn.st.free.is_empty() || !conn.st.alive {
                            ctx.ready.pop_front();
                            conn.st.ready = false;
                        }
                        if let Some(s) = slot.filter(|_| conn.st.alive) {
                            if !issue(&mut conn.st, s as usize, now, now, &mut ctx) {
                                break;
                            }
                            queue_send(conn, c, &mut dirty);
                        }
                        started += 1;
                    }
                }
                Some(iv) => loop {
                    let intended = (offset_ns + iv * next_index as f64) as u64;
                    if intended > now || intended >= phase.end_ns {
                        break;
                    }
                    // Due requests of one wake-up go to the same connection
                    // while it has free slots, so they leave in one send.
                    let Some(&c) = ctx.ready.front() else { break };
                    let conn = &mut conns[c as usize];
                    let slot = conn.st.free.pop();
                    if conn.st.free.is_empty() || !conn.st.alive {
                        ctx.ready.pop_front();
                        conn.st.ready = false;
                    }
                    let Some(s) = slot.filter(|_| conn.st.alive) else {
                        continue;
                    };
                    if !issue(&mut conn.st, s as usize, intended, now, &mut ctx) {
                        break;
                    }
                    queue_send(conn, c, &mut dirty);
                    next_index += 1;
                },
            }
        }
        if !stopping && quota == 0 {
            // The request bound: no more starts; the window ends with the
            // last of these requests.
            stopping = true;
        } else if !stopping && now >= phase.end_ns {
            stopping = true;
            stats.window_ns = phase.end_ns - phase.measure_from_ns;
            if let Some(iv) = interval_ns {
                // Requests intended before the end that found no free slot.
                let due = ((phase.end_ns as f64 - offset_ns) / iv).ceil().max(0.0) as u64;
                stats.unsent += due.saturating_sub(next_index);
            }
        }
        for c in dirty.drain(..) {
            let conn = &mut conns[c as usize];
            conn.queued = false;
            if conn.st.alive && !conn.sending && !conn.st.out.is_empty() {
                std::mem::swap(&mut conn.st.out, &mut conn.wire);
                conn.wire_off = 0;
                arm_send(&mut ring, conn, c as usize)?;
            }
        }
        let busy: usize = if stopping {
            conns.iter().map(|c| c.st.busy).sum()
        } else {
            1
        };
        if stopping && (busy == 0 || now >= drain_end_ns) {
            stats.unfinished += busy as u64;
            if stats.window_ns == 0 {
                stats.window_ns = stats.last_done_ns.saturating_sub(phase.measure_from_ns);
            }
            break;
        }
        // Sleep on the ring until a completion or the next scheduled event.
        let mut wake_ns = if stopping { drain_end_ns } else { phase.end_ns };
        if interval_ns.is_none() && !stopping && !ready.is_empty() {
            wake_ns = wake_ns.min(ramp_at(started).max(now + tick_ns));
        }
        if let (Some(iv), false) = (interval_ns, stopping) {
            if !ready.is_empty() {
                // Wake for the next due request, but not sooner than a tick
                // from now: requests due meanwhile leave together (their
                // latency still counts from their intended times).
                let next = ((offset_ns + iv * next_index as f64) as u64).max(now + tick_ns);
                wake_ns = wake_ns.min(next);
            }
        }
        let wait = Duration::from_nanos(wake_ns.saturating_sub(now_ns()));
        if wait.is_zero() {
            ring.submit()
                .map_err(|source| ClientError::Ring { op: "submit", source })?;
        } else {
            let ts = types::Timespec::from(wait);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(source) => {
                    return Err(ClientError::Ring {
                        op: "submit and wait",
                        source,
                    })
                }
            }
        }
        completions.clear();
        completions.extend(ring.completion().map(|e| (e.user_data(), e.result())));
        let now = now_ns();
        let mut ctx = Ctx {
            stats: &mut stats,
            ready: &mut ready,
            mode: &cfg.mode,
            ping_payload: &ping_payload,
            phase,
            closed_loop: interval_ns.is_none(),
            stopping,
            quota: &mut quota,
        };
        for &(ud, res) in &completions {
            let c = (ud >> 8) as usize;
            let conn = &mut conns[c];
            match ud & 0xff {
                OP_RECV => {
                    conn.receiving = false;
                    if res > 0 {
                        on_bytes(conn, c, res as usize, now, &mut ctx);
                        if conn.st.alive {
                            arm_recv(&mut ring, conn, c)?;
                        }
                    } else if res == -libc::EINTR || res == -libc::EAGAIN || res == -libc::ENOBUFS {
                        arm_recv(&mut ring, conn, c)?;
                    } else {
                        lose(&mut conn.st, &mut ctx);
                    }
                }
                OP_SEND => {
                    conn.sending = false;
                    if res >= 0 {
                        conn.wire_off += res as usize;
                        if conn.wire_off < conn.wire.len() {
                            arm_send(&mut ring, conn, c)?;
                        } else {
                            conn.wire.clear();
                            conn.wire_off = 0;
                        }
                    } else if res == -libc::EINTR || res == -libc::EAGAIN {
                        arm_send(&mut ring, conn, c)?;
                    } else {
                        lose(&mut conn.st, &mut ctx);
                    }
                }
                other => unreachable!("user_data op {other} is never submitted"),
            }
            if conn.st.alive && !conn.st.out.is_empty() {
                queue_send(conn, c as u32, &mut dirty);
            }
        }
    }
    shut_down(&mut ring, &mut conns);
    Ok(stats)
}

fn queue_send(conn: &mut Conn, c: u32, dirty: &mut Vec<u32>) {
    if !conn.queued {
        conn.queued = true;
        dirty.push(c);
    }
}

fn setup(conns_n: usize, cfg: &LoadConfig) -> Result<(IoUring, Vec<Conn>), ClientError> {
    let entries = (2 * conns_n + 64).next_power_of_two().clamp(256, 32_768) as u32;
    let ring = IoUring::builder()
        .setup_cqsize(entries * 2)
        .build(entries)
        .map_err(|source| ClientError::Ring { op: "setup", source })?;
    let mut conns = Vec::with_capacity(conns_n);
    let out_bytes = match &cfg.mode {
        Mode::Ping { payload_bytes } => HEADER_BYTES + payload_bytes,
        Mode::Generate { prompt, .. } => 2 * HEADER_BYTES + 32 + prompt.len(),
    } * cfg.inflight
        + 4096;
    for _ in 0..conns_n {
        let (client, _ack) = Client::connect_hello(cfg.addr, &cfg.auth_token, cfg.connect_timeout)?;
        let addr = client.addr();
        let sock = client.into_stream()?;
        sock.set_nonblocking(true).map_err(|source| ClientError::Io {
            op: "set non-blocking",
            addr,
            source,
        })?;
        let fd = sock.as_raw_fd();
        conns.push(Conn {
            _sock: sock,
            fd,
            rbuf: vec![0u8; RECV_BUFFER_BYTES].into_boxed_slice(),
            decoder: FrameDecoder::new(Direction::ToClient, CLIENT_PAYLOAD_BYTES_MAX),
            wire: Vec::with_capacity(out_bytes),
            wire_off: 0,
            sending: false,
            receiving: false,
            queued: false,
            st: Streams {
                fd,
                free: Vec::with_capacity(cfg.inflight),
                ready: false,
                out: Vec::with_capacity(out_bytes),
                alive: true,
                busy: 0,
                slots: vec![Slot::default(); cfg.inflight].into_boxed_slice(),
            },
        });
    }
    Ok((ring, conns))
}

fn push(ring: &mut IoUring, entry: &io_uring::squeue::Entry) -> Result<(), ClientError> {
    loop {
        // SAFETY: every entry built here points into a `Conn` buffer that
        // stays allocated and untouched until its completion is reaped
        // (`receiving`/`sending` flags, and `shut_down` waits for them).
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()
            .map_err(|source| ClientError::Ring { op: "submit", source })?;
    }
}

fn arm_recv(ring: &mut IoUring, conn: &mut Conn, c: usize) -> Result<(), ClientError> {
    debug_assert!(!conn.receiving);
    let e = opcode::Recv::new(types::Fd(conn.fd), conn.rbuf.as_mut_ptr(), conn.rbuf.len() as u32)
        .build()
        .user_data(((c as u64) << 8) | OP_RECV);
    conn.receiving = true;
    push(ring, &e)
}

fn arm_send(ring: &mut IoUring, conn: &mut Conn, c: usize) -> Result<(), ClientError> {
    debug_assert!(!conn.sending && conn.wire_off < conn.wire.len());
    let rest = &conn.wire[conn.wire_off..];
    let e = opcode::Send::new(types::Fd(conn.fd), rest.as_ptr(), rest.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(((c as u64) << 8) | OP_SEND);
    conn.sending = true;
    push(ring, &e)
}

/// Sends one request (or PING) on slot `s`; false when the request bound
/// leaves none to send.
fn issue(conn: &mut Streams, s: usize, intended_ns: u64, now: u64, ctx: &mut Ctx) -> bool {
    let recorded = intended_ns >= ctx.phase.measure_from_ns;
    if recorded {
        if *ctx.quota == 0 {
            return false;
        }
        *ctx.quota -= 1;
    }
    let slot = &mut conn.slots[s];
    debug_assert!(!slot.busy);
    slot.busy = true;
    slot.generation += 1;
    slot.recorded = recorded;
    slot.intended_ns = intended_ns;
    slot.last_ns = 0;
    slot.tokens = 0;
    slot.unacked = 0;
    slot.granted = match ctx.mode {
        Mode::Generate { credit, .. } => u64::from(*credit),
        Mode::Ping { .. } => 0,
    };
    conn.busy += 1;
    let id = stream_id(s, slot.generation);
    match ctx.mode {
        Mode::Ping { .. } => put_ping(&mut conn.out, id, s as u32, intended_ns, ctx.ping_payload),
        Mode::Generate {
            max_tokens,
            credit,
            temperature,
            prompt,
        } => {
            let params = Params {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: slot.generation,
                ..Params::default()
            };
            put_request(&mut conn.out, id, *credit, &params, prompt.as_bytes());
        }
    }
    if ctx.phase.in_window(now) {
        ctx.stats.frames_out += 1;
    }
    true
}

fn stream_id(slot: usize, generation: u64) -> u64 {
    (generation << SLOT_BITS) | (slot as u64 + 1)
}

/// The slot a stream id names, if it is the slot's current stream.
fn slot_of(conn: &Streams, id: u64) -> Option<usize> {
    let s = (id & ((1 << SLOT_BITS) - 1)).checked_sub(1)? as usize;
    let slot = conn.slots.get(s)?;
    (slot.busy && slot.generation == id >> SLOT_BITS).then_some(s)
}

/// A stream ended: record, then free or re-issue its slot.
fn finish(conn: &mut Streams, c: usize, s: usize, now: u64, ok: bool, ctx: &mut Ctx) {
    let slot = &mut conn.slots[s];
    if ok {
        if slot.recorded {
            ctx.stats.e2e.record_us(now.saturating_sub(slot.intended_ns) / 1000);
            ctx.stats.last_done_ns = now;
        }
        // Request-bound runs count exactly their measured requests.
        if ctx.phase.in_window(now) && (slot.recorded || *ctx.quota == u64::MAX) {
            ctx.stats.requests += 1;
        }
    }
    slot.busy = false;
    conn.busy -= 1;
    if ctx.stopping || !conn.alive {
        return;
    }
    if ctx.closed_loop {
        // Past the request bound the slot just stays idle.
        let _ = issue(conn, s, now, now, ctx);
    } else {
        conn.free.push(s as u32);
        if !conn.ready {
            conn.ready = true;
            ctx.ready.push_back(c as u32);
        }
    }
}

fn on_bytes(conn: &mut Conn, c: usize, n: usize, now: u64, ctx: &mut Ctx) {
    let Conn { rbuf, decoder, st, .. } = conn;
    let mut input: &[u8] = &rbuf[..n];
    loop {
        // Header fields are copied out and the payload checked in place, so
        // the decoder's borrow ends before the handler runs.
        let (kind, id, arg, aux, check) = match decoder.next(&mut input) {
            Ok(Some(f)) => {
                let check = match f.kind {
                    Kind::Pong => f.payload == ctx.ping_payload,
                    Kind::End => f.payload.len() >= cnse_proto::END_PAYLOAD_BYTES,
                    _ => true,
                };
                (f.kind, f.header.stream_id(), f.header.arg(), f.header.aux(), check)
            }
            Ok(None) => return,
            Err(_) => {
                ctx.stats.bad_frames += 1;
                lose(st, ctx);
                return;
            }
        };
        on_frame(st, c, kind, id, arg, aux, check, now, ctx);
        if !st.alive {
            return;
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn on_frame(
    conn: &mut Streams,
    c: usize,
    kind: Kind,
    id: u64,
    arg: u32,
    aux: u64,
    check: bool,
    now: u64,
    ctx: &mut Ctx,
) {
    if ctx.phase.in_window(now) {
        ctx.stats.frames_in += 1;
    }
    if kind == Kind::Error && id == 0 {
        // The server is closing the connection; its streams are gone.
        *ctx.stats.errors.entry(arg).or_default() += 1;
        return;
    }
    let Some(s) = slot_of(conn, id) else {
        ctx.stats.bad_frames += 1;
        return;
    };
    match kind {
        Kind::Pong => {
            if !check || aux != conn.slots[s].intended_ns {
                ctx.stats.bad_frames += 1;
            }
            finish(conn, c, s, now, check, ctx);
        }
        Kind::Tokens => {
            let in_window = ctx.phase.in_window(now);
            let slot = &mut conn.slots[s];
            if aux != slot.tokens || arg == 0 {
                ctx.stats.bad_frames += 1;
            }
            if slot.recorded {
                if slot.tokens == 0 {
                    ctx.stats.ttft.record_us(now.saturating_sub(slot.intended_ns) / 1000);
                } else {
                    ctx.stats.inter_token.record_us(now.saturating_sub(slot.last_ns) / 1000);
                }
                if arg > 1 {
                    ctx.stats.inter_token.record_n_us(0, u64::from(arg - 1));
                }
            }
            slot.tokens += u64::from(arg);
            slot.last_ns = now;
            if slot.granted > 0 && slot.tokens > slot.granted {
                // The page: the sum of TOKENS `arg` never exceeds the credit.
                ctx.stats.bad_frames += 1;
            }
            if in_window {
                ctx.stats.tokens += u64::from(arg);
            }
            if let Mode::Generate { credit, .. } = ctx.mode {
                if *credit > 0 {
                    // Re-grant in halves of the window so the server never
                    // waits on a round trip while tokens are in flight.
                    slot.unacked = slot.unacked.saturating_add(arg);
                    if slot.unacked >= (*credit / 2).max(1) {
                        put_credit(&mut conn.out, id, slot.unacked);
                        slot.granted += u64::from(slot.unacked);
                        slot.unacked = 0;
                        if in_window {
                            ctx.stats.frames_out += 1;
                        }
                    }
                }
            }
        }
        Kind::End => {
            let ok = check && aux == conn.slots[s].tokens;
            if !ok {
                ctx.stats.bad_frames += 1;
            }
            finish(conn, c, s, now, ok, ctx);
        }
        Kind::Error => {
            *ctx.stats.errors.entry(arg).or_default() += 1;
            finish(conn, c, s, now, false, ctx);
        }
        Kind::HelloAck | Kind::Hello | Kind::Request | Kind::Cancel | Kind::Credit | Kind::Ping => {
            ctx.stats.bad_frames += 1;
        }
    }
}

/// The connection failed or was closed: its streams are lost.
fn lose(conn: &mut Streams, ctx: &mut Ctx) {
    if !conn.alive {
        return;
    }
    conn.alive = false;
    ctx.stats.connections_lost += 1;
    for slot in conn.slots.iter_mut() {
        slot.busy = false;
    }
    conn.busy = 0;
    // SAFETY: shutdown on an fd this connection owns; it makes any recv or
    // send in flight complete so its buffer is handed back.
    unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
}

/// Makes every operation in flight complete before the buffers are freed.
fn shut_down(ring: &mut IoUring, conns: &mut Vec<Conn>) {
    for conn in conns.iter() {
        // SAFETY: as in `lose`.
        unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
    }
    let deadline = Instant::now() + SHUTDOWN_WAIT;
    let mut outstanding: usize = conns
        .iter()
        .map(|c| usize::from(c.receiving) + usize::from(c.sending))
        .sum();
    while outstanding > 0 && Instant::now() < deadline {
        let ts = types::Timespec::from(Duration::from_millis(50));
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        for e in ring.completion() {
            let conn = &mut conns[(e.user_data() >> 8) as usize];
            match e.user_data() & 0xff {
                OP_RECV => conn.receiving = false,
                _ => conn.sending = false,
            }
            outstanding -= 1;
        }
    }
    if outstanding > 0 {
        // The kernel still holds some buffers: leak them rather than free
        // memory it may write into.
        std::mem::forget(std::mem::take(conns));
    }
}
