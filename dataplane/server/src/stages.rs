//! Per-stage timing of requests (`Config::stage_timing`, `cnse-dp serve
//! --stage-timing`): where a request's time goes inside one worker, from
//! the turn whose completions carried it to the system call that handed
//! its END to the kernel; and how long the loop's turns are.
//!
//! Stages of a request, each a histogram:
//! - `recv→parse`: from the moment the ring wait returned with the bytes to
//!   the REQUEST's checks passing (completions handled before it this turn);
//! - `parse→backend`: to the backend's first token in the stream's queue
//!   (the admission queue and the backend's poll);
//! - `backend→end`: to the END frame written into the output buffer
//!   (remaining tokens, credit, framing);
//! - `end→submit`: to the ring enter that hands that output to the kernel
//!   (a connection whose previous send is still in flight waits for it).
//!   Recorded per send with the oldest END's time for every END in it: an
//!   upper bound per request.
//!
//! And per turn: `turn busy` (wait returned → next wait), `turn wait`
//! (time blocked in the ring), `events/turn` (completions handled).
//!
//! Off by default: every stamp is a clock read (vDSO, tens of ns). The
//! client's side (intended → sent → first token → END) is in the load
//! generator's table; what neither side sees is the kernel between them.

use std::time::Instant;

use cnse_metrics::{fmt_us, LatencyHistogram};

/// One worker's stage histograms.
#[derive(Debug, Default, Clone)]
pub struct StageTimes {
    pub worker: usize,
    pub recv_parse: LatencyHistogram,
    pub parse_backend: LatencyHistogram,
    pub backend_end: LatencyHistogram,
    pub end_submit: LatencyHistogram,
    pub turn_busy: LatencyHistogram,
    pub turn_wait: LatencyHistogram,
    /// Completions per turn (a count, kept in a latency histogram's
    /// buckets).
    pub turn_events: LatencyHistogram,
    /// (oldest END framed, ENDs) of each send submitted this turn, until the
    /// ring enter that hands them to the kernel. At most one per connection
    /// per turn (a connection has one send in flight), so bounded by the
    /// connection table.
    pub(crate) pending: Vec<(Instant, u32)>,
}

impl StageTimes {
    pub(crate) fn new(worker: usize, conns_max: usize) -> StageTimes {
        StageTimes {
            worker,
            pending: Vec::with_capacity(conns_max),
            ..StageTimes::default()
        }
    }

    /// The sends queued this turn reach the kernel at `now`.
    pub(crate) fn submitted(&mut self, now: Instant) {
        for &(first_end, ends) in &self.pending {
            self.end_submit
                .record_n_us(micros(now.saturating_duration_since(first_end)), u64::from(ends));
        }
        self.pending.clear();
    }

    /// Adds another worker's histograms (the process total).
    pub fn merge(&mut self, o: &StageTimes) {
        for (a, b) in [
            (&mut self.recv_parse, &o.recv_parse),
            (&mut self.parse_backend, &o.parse_backend),
            (&mut self.backend_end, &o.backend_end),
            (&mut self.end_submit, &o.end_submit),
            (&mut self.turn_busy, &o.turn_busy),
            (&mut self.turn_wait, &o.turn_wait),
            (&mut self.turn_events, &o.turn_events),
        ] {
            // Histograms of one shape: merging cannot fail.
            let _ = a.merge(b);
        }
    }

    /// The table `serve --stage-timing` prints at exit.
    pub fn render(&self) -> String {
        let rows = [
            ("recv→parse", &self.recv_parse),
            ("parse→backend", &self.parse_backend),
            ("backend→end", &self.backend_end),
            ("end→submit", &self.end_submit),
            ("turn busy", &self.turn_busy),
            ("turn wait", &self.turn_wait),
        ];
        let mut s = format!(
            "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "stage", "count", "mean", "p50", "p90", "p95", "p99", "p99.9", "max"
        );
        for (name, h) in rows {
            let q = |x| fmt_us(h.quantile_us(x) as f64);
            s.push_str(&format!(
                "{:<14} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
                name,
                h.count(),
                fmt_us(h.mean_us()),
                q(0.5),
                q(0.9),
                q(0.95),
                q(0.99),
                q(0.999),
                fmt_us(h.max_us() as f64)
            ));
        }
        let e = &self.turn_events;
        s.push_str(&format!(
            "{:<14} {:>10} {:>9.1} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "events/turn",
            e.count(),
            e.mean_us(),
            e.quantile_us(0.5),
            e.quantile_us(0.9),
            e.quantile_us(0.95),
            e.quantile_us(0.99),
            e.quantile_us(0.999),
            e.max_us()
        ));
        s
    }
}

pub(crate) fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
