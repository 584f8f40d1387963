//! What a run measured: per-thread counters and histograms, merged into
//! the report that `cnse-dp bench` prints.

use std::collections::BTreeMap;
use std::time::Duration;

use cnse_metrics::{LatencyHistogram, Rate, Summary};

use crate::ClientError;

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
    /// Gap between consecutive TOKENS frames of a stream (one value per
    /// frame after the first). Tokens packed into one frame arrived
    /// together: they are counted in `tokens_coalesced`, not recorded here
    /// as 0 µs gaps.
    pub inter_token: LatencyHistogram,
    /// REQUEST (or PING) to END (or PONG): the requests answered well.
    pub e2e: LatencyHistogram,
    /// REQUEST to its ERROR reply (a fast "no" is not a fast answer: kept
    /// apart from `e2e`).
    pub e2e_error: LatencyHistogram,
    /// Requests sent but not answered when the run gave up on them (the
    /// drain timeout): the time from intended send to giving up, a lower
    /// bound of their latency.
    pub e2e_unanswered: LatencyHistogram,
    /// Open loop: requests intended in the window that no slot could send
    /// before the run gave up: from intended send to giving up (a lower
    /// bound).
    pub e2e_unsent: LatencyHistogram,
    /// Open loop, the two parts of `e2e`: from the intended time to the
    /// request written for the kernel (the generator's own lag), and from
    /// there to END (the server, and the kernel both ways).
    pub send_delay: LatencyHistogram,
    pub rtt: LatencyHistogram,
    /// Streams completed successfully inside the window.
    pub requests: u64,
    pub tokens: u64,
    /// Tokens (inside the window) that arrived in the same TOKENS frame as
    /// an earlier token of their stream: no gap of their own to measure.
    pub tokens_coalesced: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// ERROR frames by code.
    pub errors: BTreeMap<u32, u64>,
    /// Connections the server closed or that failed during the run.
    pub connections_lost: u64,
    /// HTTP mode: keep-alive connections the server ended between
    /// responses (`Connection: close`, or a close after a complete
    /// response) that were opened again, and the requests sent again on
    /// them (sent before the close, never answered). Not failures.
    pub reconnects: u64,
    pub resent: u64,
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
    /// The kernel's share (0..=1) of `server_cpu` and of `client_cpu`,
    /// from the processes' user and system ticks over the same window: on
    /// loopback TCP most of a request's cost is the kernel's, which no
    /// server code removes (`server_kernel_cpu` below).
    pub server_kernel_share: Option<f64>,
    pub client_kernel_share: Option<f64>,
    /// CPU time of the load generator's own threads during the window
    /// (each thread's CPU clock, summed): the load's cost even where the
    /// process also runs a server (`demo`).
    pub load_cpu: Duration,
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
    pub(super) fn absorb(&mut self, s: &ThreadStats) -> Result<(), ClientError> {
        let merge =
            |a: &mut LatencyHistogram, b: &LatencyHistogram| a.merge(b).map_err(|e| ClientError::Load(e.to_string()));
        merge(&mut self.ttft, &s.ttft)?;
        merge(&mut self.inter_token, &s.inter_token)?;
        merge(&mut self.e2e, &s.e2e)?;
        merge(&mut self.e2e_error, &s.e2e_error)?;
        merge(&mut self.e2e_unanswered, &s.e2e_unanswered)?;
        merge(&mut self.e2e_unsent, &s.e2e_unsent)?;
        merge(&mut self.send_delay, &s.send_delay)?;
        merge(&mut self.rtt, &s.rtt)?;
        self.requests += s.requests;
        self.tokens += s.tokens;
        self.tokens_coalesced += s.tokens_coalesced;
        self.load_cpu += Duration::from_nanos(s.load_cpu_ns);
        self.frames_in += s.frames_in;
        self.frames_out += s.frames_out;
        for (code, n) in &s.errors {
            *self.errors.entry(*code).or_default() += n;
        }
        self.connections_lost += s.connections_lost;
        self.reconnects += s.reconnects;
        self.resent += s.resent;
        self.bad_frames += s.bad_frames;
        self.unsent += s.unsent;
        self.unfinished += s.unfinished;
        Ok(())
    }

    /// Whether the run streamed tokens (generate and HTTP modes).
    fn streams_tokens(&self) -> bool {
        matches!(self.mode, "generate" | "http")
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Every request the run measured, whatever became of it: answered
    /// well, answered with an ERROR, or given up on (unanswered, unsent:
    /// counted at the time the run gave up, a lower bound).
    pub fn e2e_all(&self) -> Result<LatencyHistogram, ClientError> {
        let mut all = self.e2e.clone();
        for h in [&self.e2e_error, &self.e2e_unanswered, &self.e2e_unsent] {
            all.merge(h).map_err(|e| ClientError::Load(e.to_string()))?;
        }
        Ok(all)
    }

    /// Latency rows for the table/CSV: TTFT and inter-token (between
    /// frames) when generating; `e2e` for the requests answered well, and
    /// apart from it those answered with an ERROR, unanswered and unsent
    /// (each row only when it has values); `e2e_all` over every measured
    /// request (always in an open loop, where it is the figure to quote).
    pub fn summaries(&self) -> Vec<Summary> {
        let mut v = Vec::with_capacity(9);
        if self.streams_tokens() {
            v.push(self.ttft.summary("ttft"));
            v.push(self.inter_token.summary("inter_token"));
        }
        v.push(self.e2e.summary("e2e"));
        let mut failed = false;
        for (h, name) in [
            (&self.e2e_error, "e2e_error"),
            (&self.e2e_unanswered, "e2e_unanswered"),
            (&self.e2e_unsent, "e2e_unsent"),
        ] {
            if h.count() > 0 {
                v.push(h.summary(name));
                failed = true;
            }
        }
        if failed || self.rate_per_s.is_some() {
            // Histograms of one shape always merge.
            if let Ok(all) = self.e2e_all() {
                v.push(all.summary("e2e_all"));
            }
        }
        if self.rate_per_s.is_some() {
            v.push(self.send_delay.summary("send_delay"));
            v.push(self.rtt.summary("rtt"));
        }
        v
    }

    pub fn rates(&self) -> Vec<Rate> {
        let w = self.window;
        let mut v = vec![Rate::new("requests", self.requests, w)];
        if self.streams_tokens() {
            v.push(Rate::new("tokens", self.tokens, w));
            v.push(Rate::new("tokens_coalesced", self.tokens_coalesced, w));
        }
        v.push(Rate::new("frames_in", self.frames_in, w));
        v.push(Rate::new("frames_out", self.frames_out, w));
        v
    }

    /// CPU used over the window, as rates of CPU-µs per second (1,000,000
    /// is one core busy): `load_cpu` (the load generator's threads) always,
    /// `server_cpu` when the server was measured.
    pub fn cpu_use(&self) -> Vec<Rate> {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut v = vec![Rate::new("load_cpu", us(self.load_cpu), self.window)];
        if let Some(cpu) = self.server_cpu {
            v.push(Rate::new("server_cpu", us(cpu), self.window));
        }
        if let Some(kernel) = self.server_kernel_cpu() {
            v.push(Rate::new("server_kernel_cpu", us(kernel), self.window));
        }
        v
    }

    /// The part of `server_cpu` spent in the kernel (system time), when
    /// both were measured.
    pub fn server_kernel_cpu(&self) -> Option<Duration> {
        Some(self.server_cpu?.mul_f64(self.server_kernel_share?))
    }

    /// Throughput per CPU-second of the server process, when it was
    /// measured: `requests_per_server_cpu_s` and `tokens_per_server_cpu_s`.
    pub fn cpu_rates(&self) -> Vec<Rate> {
        let Some(cpu) = self.server_cpu else {
            return Vec::new();
        };
        let mut v = vec![Rate::new("requests_per_server_cpu_s", self.requests, cpu)];
        if self.streams_tokens() {
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
                "requests never sent (no free slot: offered rate above capacity; counted in e2e_unsent and e2e_all)",
            ),
            (
                self.unfinished,
                "streams unfinished at the drain timeout (counted in e2e_unanswered)",
            ),
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
            Some(r) => format!("open loop {r:.0}/s"),
            None => "closed loop".to_string(),
        };
        format!(
            "{} c={} k={} t={} {shape}",
            self.mode, self.connections, self.inflight, self.threads
        )
    }
}

/// One client thread's counters (merged by [`LoadReport::absorb`]).
#[derive(Default)]
pub(super) struct ThreadStats {
    /// Length of this thread's measured window.
    pub(super) window_ns: u64,
    /// When the last measured request ended.
    pub(super) last_done_ns: u64,
    pub(super) ttft: LatencyHistogram,
    pub(super) inter_token: LatencyHistogram,
    pub(super) e2e: LatencyHistogram,
    pub(super) e2e_error: LatencyHistogram,
    pub(super) e2e_unanswered: LatencyHistogram,
    pub(super) e2e_unsent: LatencyHistogram,
    pub(super) send_delay: LatencyHistogram,
    pub(super) rtt: LatencyHistogram,
    pub(super) requests: u64,
    pub(super) tokens: u64,
    pub(super) tokens_coalesced: u64,
    /// This thread's CPU time over its measured window.
    pub(super) load_cpu_ns: u64,
    pub(super) frames_in: u64,
    pub(super) frames_out: u64,
    pub(super) errors: BTreeMap<u32, u64>,
    pub(super) connections_lost: u64,
    pub(super) reconnects: u64,
    pub(super) resent: u64,
    pub(super) bad_frames: u64,
    pub(super) unsent: u64,
    pub(super) unfinished: u64,
}
