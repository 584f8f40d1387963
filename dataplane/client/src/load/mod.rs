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
//!
//! Layout: [`config`] (what a run is asked), [`schedule`] (closed-loop ramp
//! and open-loop schedule), [`driver`] (one thread's loop on its
//! [`cnse_ring::Ring`]), [`conn`] (a connection's ops, each an explicit
//! state), [`streams`] (the pure per-connection stream state machine),
//! [`report`] (what was measured).

mod config;
mod conn;
mod driver;
mod http;
mod report;
mod resp;
mod schedule;
mod streams;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::ClientError;

pub use config::{LoadConfig, Mode};
pub use report::LoadReport;
pub use resp::RESP_ERROR_CODE;

/// Most streams in flight per connection (slot index lives in 16 bits of
/// the stream id).
pub const INFLIGHT_MAX: usize = 4096;
/// Most connections per run.
pub const CONNECTIONS_MAX: usize = 100_000;
/// Default of [`LoadConfig::open_loop_tick`].
pub const OPEN_LOOP_TICK_US_DEFAULT: u64 = 100;

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
            .spawn(move || driver::worker(t, conns, &cfg, &barrier))
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
    let ticks_start = (cfg.server_pid.and_then(cpu_ticks), cpu_ticks(own_pid));
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
    let ticks_end = (cfg.server_pid.and_then(cpu_ticks), cpu_ticks(own_pid));
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
    report.server_kernel_share = kernel_share(ticks_start.0, ticks_end.0);
    report.client_kernel_share = kernel_share(ticks_start.1, ticks_end.1);
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

/// A process's CPU time so far in clock ticks, (user, system), summed over
/// its threads (fields 14 and 15 of /proc/PID/stat); `None` when the
/// process is gone.
pub fn cpu_ticks(pid: u32) -> Option<(u64, u64)> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// (utime, stime) of a /proc/PID/stat line.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields counted here start after its closing one, at field 3.
    let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().skip(11);
    let user = rest.next()?.parse().ok()?;
    let system = rest.next()?.parse().ok()?;
    Some((user, system))
}

/// The kernel's part of a process's CPU time between two samples of
/// [`cpu_ticks`] (0..=1; `None` with no tick in between). Ticks are 10 ms:
/// over a window of seconds the share is good to a percent or so.
fn kernel_share(start: Option<(u64, u64)>, end: Option<(u64, u64)>) -> Option<f64> {
    let ((u0, s0), (u1, s1)) = (start?, end?);
    let (user, system) = (u1.saturating_sub(u0), s1.saturating_sub(s0));
    (user + system > 0).then(|| system as f64 / (user + system) as f64)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_ticks_are_read_past_any_command_name() {
        let line = "4242 (cnse (dp) x) S 1 4242 4242 0 -1 4194560 2055 0 0 0 377 1234 0 0 20 0 3 0 99 0 0";
        assert_eq!(stat_ticks(line), Some((377, 1234)));
        assert_eq!(stat_ticks("4242 (short) S 1 2"), None);
        assert_eq!(stat_ticks("no parenthesis at all"), None);
        let own = cpu_ticks(std::process::id()).expect("this process's stat");
        assert!(own.0 + own.1 < u64::MAX / 2);
    }

    #[test]
    fn the_kernel_share_is_system_over_user_and_system() {
        assert_eq!(kernel_share(Some((10, 20)), Some((13, 29))), Some(0.75));
        assert_eq!(kernel_share(Some((10, 20)), Some((10, 20))), None, "no tick: no share");
        assert_eq!(kernel_share(None, Some((1, 1))), None);
    }
}
