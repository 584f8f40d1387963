//! Prometheus text exposition of the server's counters (`GET /metrics` on
//! the HTTP front).

use std::io::Write as _;

use crate::session::Counters;

/// Writes the counters of `workers` (summed) in the text format.
pub(crate) fn render_counters(out: &mut Vec<u8>, workers: &[Counters]) {
    let sum = |f: fn(&Counters) -> u64| workers.iter().map(f).sum::<u64>();
    let rows: [(&str, &str, &str, u64); 9] = [
        ("cnse_connections_open", "gauge", "Connections open.", sum(|c| c.conns_open)),
        ("cnse_connections_accepted_total", "counter", "Connections accepted.", sum(|c| c.accepted)),
        ("cnse_streams_open", "gauge", "Streams open (queued or running).", sum(|c| c.streams_open)),
        ("cnse_requests_total", "counter", "Requests admitted (both protocols).", sum(|c| c.requests)),
        ("cnse_requests_rejected_total", "counter", "Requests and connections refused.", sum(|c| c.rejected)),
        ("cnse_tokens_sent_total", "counter", "Tokens sent to clients.", sum(|c| c.tokens_sent)),
        ("cnse_tokens_produced_total", "counter", "Tokens produced by the backends.", sum(|c| c.tokens_produced)),
        ("cnse_protocol_violations_total", "counter", "Protocol violations answered.", sum(|c| c.violations)),
        ("cnse_frames_out_total", "counter", "Frames and responses sent.", sum(|c| c.frames_out)),
    ];
    for (name, kind, help, value) in rows {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n");
    }
}
