//! Prometheus text exposition of the server (`GET /metrics` on the HTTP
//! front): the workers' live counters (published every turn), and the
//! per-worker request metrics below, recorded by the session and copied to
//! the shared snapshot on every timeout sweep (100 ms: a scrape sees them
//! at most that late).

use std::io::Write as _;

use crate::session::Counters;

/// Upper bounds of the latency buckets, in µs (`le`, then +Inf).
const BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    10_000_000,
];

/// A fixed-bucket latency histogram (Prometheus's shape): recording is a
/// scan of 16 bounds and an increment, no allocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Buckets {
    counts: [u64; BOUNDS_US.len() + 1],
    sum_us: u64,
}

impl Buckets {
    pub fn record_us(&mut self, us: u64) {
        let i = BOUNDS_US.iter().position(|&b| us <= b).unwrap_or(BOUNDS_US.len());
        self.counts[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    fn add(&mut self, o: &Buckets) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(o.sum_us);
    }
}

/// Protocols, in label order.
pub const PROTOCOLS: [&str; 2] = ["binary", "http"];
/// How a request ended, in label order.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// END: the backend finished (length or stop).
    Ok = 0,
    /// ERROR after the stream opened (backend failure, stall, shutdown).
    Error = 1,
    /// Refused before it opened (checks, admission).
    Rejected = 2,
    /// Cancelled by the client (CANCEL or a disconnect).
    Cancelled = 3,
}
const OUTCOMES: [&str; 4] = ["ok", "error", "rejected", "cancelled"];
/// Error codes counted by value; others count as "other".
const CODES: [u32; 14] = [400, 401, 404, 405, 408, 409, 413, 429, 431, 500, 501, 502, 503, 504];

/// One worker's request metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct RequestMetrics {
    pub ttft: Buckets,
    pub inter_token: Buckets,
    pub e2e: Buckets,
    requests: [[u64; 4]; 2],
    errors: [u64; CODES.len() + 1],
    /// Admission queue length and streams running, at the last snapshot.
    pub queued: u64,
    pub running: u64,
    /// Model servers behind the backend and those in rotation (the same
    /// servers for every worker: the process reports the largest count).
    pub servers: u64,
    pub servers_up: u64,
    /// Connections the backend holds open ahead of requests (process-wide:
    /// the largest count a worker reported).
    pub spares: u64,
    /// The backend's event counts (`cnse_backend::EVENTS`).
    pub backend_events: [u64; cnse_backend::EVENTS.len()],
}

impl RequestMetrics {
    pub fn outcome(&mut self, http: bool, o: Outcome) {
        self.requests[usize::from(http)][o as usize] += 1;
    }

    pub fn error(&mut self, code: u32) {
        let i = CODES.iter().position(|&c| c == code).unwrap_or(CODES.len());
        self.errors[i] += 1;
    }

    fn add(&mut self, o: &RequestMetrics) {
        self.ttft.add(&o.ttft);
        self.inter_token.add(&o.inter_token);
        self.e2e.add(&o.e2e);
        for (a, b) in self.requests.iter_mut().zip(o.requests) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        for (a, b) in self.errors.iter_mut().zip(o.errors) {
            *a += b;
        }
        self.queued += o.queued;
        self.running += o.running;
        self.servers = self.servers.max(o.servers);
        self.servers_up = self.servers_up.max(o.servers_up);
        self.spares = self.spares.max(o.spares);
        for (a, b) in self.backend_events.iter_mut().zip(o.backend_events) {
            *a += b;
        }
    }
}

fn family(out: &mut Vec<u8>, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

fn histogram(out: &mut Vec<u8>, name: &str, help: &str, b: &Buckets) {
    family(out, name, "histogram", help);
    let mut cum = 0;
    for (i, bound) in BOUNDS_US.iter().enumerate() {
        cum += b.counts[i];
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cum}", *bound as f64 / 1e6);
    }
    cum += b.counts[BOUNDS_US.len()];
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
    let _ = writeln!(out, "{name}_sum {}", b.sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cum}");
}

/// Writes the whole exposition: counters of `workers` and their request
/// metrics, summed.
pub(crate) fn render(out: &mut Vec<u8>, workers: &[Counters], requests: &[RequestMetrics]) {
    let sum = |f: fn(&Counters) -> u64| workers.iter().map(f).sum::<u64>();
    let mut r = RequestMetrics::default();
    for w in requests {
        r.add(w);
    }
    let gauges: [(&str, &str, &str, u64); 2] = [
        (
            "cnse_connections_open",
            "gauge",
            "Connections open (both protocols).",
            sum(|c| c.conns_open),
        ),
        (
            "cnse_admission_queue_depth",
            "gauge",
            "Requests waiting for backend capacity.",
            r.queued,
        ),
    ];
    let counters: [(&str, &str, &str, u64); 6] = [
        (
            "cnse_connections_accepted_total",
            "counter",
            "Connections accepted.",
            sum(|c| c.accepted),
        ),
        (
            "cnse_tokens_sent_total",
            "counter",
            "Tokens sent to clients.",
            sum(|c| c.tokens_sent),
        ),
        (
            "cnse_tokens_produced_total",
            "counter",
            "Tokens produced by the backends.",
            sum(|c| c.tokens_produced),
        ),
        (
            "cnse_protocol_violations_total",
            "counter",
            "Protocol violations answered.",
            sum(|c| c.violations),
        ),
        (
            "cnse_frames_in_total",
            "counter",
            "Frames and HTTP requests received.",
            sum(|c| c.frames_in),
        ),
        (
            "cnse_frames_out_total",
            "counter",
            "Frames and HTTP responses sent.",
            sum(|c| c.frames_out),
        ),
    ];
    for (name, kind, help, value) in gauges.into_iter().chain(counters) {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        out,
        "cnse_backend_servers",
        "gauge",
        "Model servers behind the backend, by health.",
    );
    let _ = writeln!(out, "cnse_backend_servers{{state=\"up\"}} {}", r.servers_up);
    let _ = writeln!(
        out,
        "cnse_backend_servers{{state=\"down\"}} {}",
        r.servers - r.servers_up.min(r.servers)
    );
    family(
        out,
        "cnse_backend_spare_connections",
        "gauge",
        "Connections to model servers held open ahead of requests (--llama-spare-conns, --llama-spares-max).",
    );
    let _ = writeln!(out, "cnse_backend_spare_connections {}", r.spares);
    family(
        out,
        "cnse_backend_events_total",
        "counter",
        "Gateway backend events by kind (docs/HTTP.md lists them).",
    );
    for ((name, _), n) in cnse_backend::EVENTS.iter().zip(r.backend_events) {
        let _ = writeln!(out, "cnse_backend_events_total{{event=\"{name}\"}} {n}");
    }
    family(
        out,
        "cnse_requests_run_total",
        "counter",
        "Requests started on a backend: by the core that owns the client (local), or stolen by an idle core (stolen).",
    );
    let _ = writeln!(
        out,
        "cnse_requests_run_total{{core=\"local\"}} {}",
        sum(|c| c.ran_local)
    );
    let _ = writeln!(
        out,
        "cnse_requests_run_total{{core=\"stolen\"}} {}",
        sum(|c| c.stolen_in)
    );
    family(out, "cnse_streams", "gauge", "Streams open, by state.");
    let open = sum(|c| c.streams_open);
    let _ = writeln!(out, "cnse_streams{{state=\"queued\"}} {}", r.queued);
    let _ = writeln!(out, "cnse_streams{{state=\"running\"}} {}", r.running);
    let _ = writeln!(
        out,
        "cnse_streams{{state=\"sending\"}} {}",
        open.saturating_sub(r.queued + r.running)
    );
    family(
        out,
        "cnse_requests_total",
        "counter",
        "Requests by protocol and outcome.",
    );
    for (p, proto) in PROTOCOLS.iter().enumerate() {
        for (o, outcome) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "cnse_requests_total{{protocol=\"{proto}\",outcome=\"{outcome}\"}} {}",
                r.requests[p][o]
            );
        }
    }
    family(
        out,
        "cnse_errors_total",
        "counter",
        "Errors answered, by code (protocol code = HTTP status).",
    );
    for (i, n) in r.errors.iter().enumerate() {
        match CODES.get(i) {
            Some(c) => {
                let _ = writeln!(out, "cnse_errors_total{{code=\"{c}\"}} {n}");
            }
            None => {
                let _ = writeln!(out, "cnse_errors_total{{code=\"other\"}} {n}");
            }
        }
    }
    histogram(
        out,
        "cnse_ttft_seconds",
        "Time to first token (request received to first tokens written).",
        &r.ttft,
    );
    histogram(
        out,
        "cnse_inter_token_seconds",
        "Gap between a stream's successive token writes.",
        &r.inter_token,
    );
    histogram(out, "cnse_e2e_seconds", "Request received to END written.", &r.e2e);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_in_the_text() {
        let mut m = RequestMetrics::default();
        for us in [10, 60, 60, 20_000_000] {
            m.e2e.record_us(us);
        }
        m.outcome(true, Outcome::Ok);
        m.error(429);
        m.error(7);
        let mut out = Vec::new();
        render(&mut out, &[Counters::default()], &[m]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("cnse_e2e_seconds_bucket{le=\"0.00005\"} 1\n"), "{text}");
        assert!(text.contains("cnse_e2e_seconds_bucket{le=\"0.0001\"} 3\n"), "{text}");
        assert!(text.contains("cnse_e2e_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("cnse_requests_total{protocol=\"http\",outcome=\"ok\"} 1\n"));
        assert!(text.contains("cnse_errors_total{code=\"429\"} 1\n"));
        assert!(text.contains("cnse_errors_total{code=\"other\"} 1\n"));
    }
}
