//! One sample a second: the server process as the kernel sees it (RSS,
//! descriptors, threads from /proc/PID) and as it reports itself (its
//! Prometheus `/metrics`), beside the population's tallies; one CSV row each.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::population::{Tally, ROLES};

/// Phases of a run, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before any client: the level everything must come back to.
    Baseline,
    /// The population runs.
    Run,
    /// The population has stopped; the server lets go of what it held.
    After,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Baseline => "baseline",
            Phase::Run => "run",
            Phase::After => "after",
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Server {
    pub rss_kib: u64,
    pub fds: u64,
    pub threads: u64,
    /// `cnse_connections_open` (the scrape's own connection included).
    pub conns: u64,
    /// `cnse_streams`, all states.
    pub streams: u64,
    pub accepted: u64,
    pub violations: u64,
    pub tokens_sent: u64,
    /// `cnse_requests_total` of the binary protocol: ok, error, rejected,
    /// cancelled.
    pub requests: [u64; 4],
}

/// The population's passed and failed counts per role, in `ROLES` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: [u64; 5],
    pub failed: [u64; 5],
}

impl Counts {
    pub fn of(tally: &Tally) -> Self {
        Self {
            ok: ROLES.map(|r| tally.ok(r)),
            failed: ROLES.map(|r| tally.failed(r)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub t_s: f64,
    pub phase: Phase,
    pub server: Server,
    /// The population's passed and failed counts per role, in `ROLES` order.
    pub ok: [u64; 5],
    pub failed: [u64; 5],
}

impl Sample {
    pub fn new(t_s: f64, phase: Phase, server: Server, tally: &Tally) -> Self {
        Self {
            t_s,
            phase,
            server,
            ok: ROLES.map(|r| tally.ok(r)),
            failed: ROLES.map(|r| tally.failed(r)),
        }
    }

    pub fn counts(&self) -> Counts {
        Counts {
            ok: self.ok,
            failed: self.failed,
        }
    }
}

pub const CSV_HEADER: &str = "t_s,phase,rss_kib,fds,threads,conns,streams,accepted,violations,tokens_sent,req_ok,req_error,req_rejected,req_cancelled,good_ok,good_failed,cancel_ok,cancel_failed,slow_ok,slow_failed,garbage_ok,garbage_failed,churn_ok,churn_failed";

pub fn csv_row(s: &Sample) -> String {
    let v = &s.server;
    let mut row = format!(
        "{:.1},{},{},{},{},{},{},{},{},{},{},{},{},{}",
        s.t_s,
        s.phase.name(),
        v.rss_kib,
        v.fds,
        v.threads,
        v.conns,
        v.streams,
        v.accepted,
        v.violations,
        v.tokens_sent,
        v.requests[0],
        v.requests[1],
        v.requests[2],
        v.requests[3]
    );
    for (ok, failed) in s.ok.iter().zip(s.failed) {
        row.push_str(&format!(",{ok},{failed}"));
    }
    row
}

/// Reads the CSV back (for `--plot-only`).
pub fn parse_csv(text: &str) -> Result<Vec<Sample>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != CSV_HEADER.split(',').count() {
            return Err(format!("line {}: {} fields", n + 1, f.len()));
        }
        let num = |i: usize| {
            f[i].parse::<u64>()
                .map_err(|_| format!("line {}: field {i} {:?}", n + 1, f[i]))
        };
        let phase = match f[1] {
            "baseline" => Phase::Baseline,
            "run" => Phase::Run,
            "after" => Phase::After,
            p => return Err(format!("line {}: phase {p:?}", n + 1)),
        };
        let mut ok = [0; 5];
        let mut failed = [0; 5];
        for i in 0..5 {
            ok[i] = num(14 + 2 * i)?;
            failed[i] = num(15 + 2 * i)?;
        }
        out.push(Sample {
            t_s: f[0].parse().map_err(|_| format!("line {}: time {:?}", n + 1, f[0]))?,
            phase,
            server: Server {
                rss_kib: num(2)?,
                fds: num(3)?,
                threads: num(4)?,
                conns: num(5)?,
                streams: num(6)?,
                accepted: num(7)?,
                violations: num(8)?,
                tokens_sent: num(9)?,
                requests: [num(10)?, num(11)?, num(12)?, num(13)?],
            },
            ok,
            failed,
        });
    }
    Ok(out)
}

/// The process's RSS, descriptors and threads; None once it is gone.
pub fn proc_of(pid: u32) -> Option<(u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some((field("VmRSS:")?, fds, field("Threads:")?))
}

/// Largest /metrics answer read (it is a few KiB).
const METRICS_BYTES_MAX: u64 = 1 << 20;

/// Scrapes `GET /metrics` (HTTP/1.1, Connection: close) into `s`.
pub fn scrape(addr: SocketAddr, s: &mut Server) -> Result<(), String> {
    let t = Duration::from_secs(5);
    let mut c = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("metrics {addr}: {e}"))?;
    c.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    let mut body = String::new();
    c.take(METRICS_BYTES_MAX)
        .read_to_string(&mut body)
        .map_err(|e| format!("metrics {addr}: {e}"))?;
    if !body.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "metrics {addr}: {}",
            body.lines().next().unwrap_or("empty answer")
        ));
    }
    parse_metrics(&body, s);
    Ok(())
}

/// Takes the values the soak watches from a Prometheus exposition.
pub fn parse_metrics(text: &str, s: &mut Server) {
    s.streams = 0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let v = v as u64;
        let outcome = |o: &str| name == format!("cnse_requests_total{{protocol=\"binary\",outcome=\"{o}\"}}");
        match name {
            "cnse_connections_open" => s.conns = v,
            "cnse_connections_accepted_total" => s.accepted = v,
            "cnse_protocol_violations_total" => s.violations = v,
            "cnse_tokens_sent_total" => s.tokens_sent = v,
            n if n.starts_with("cnse_streams{") => s.streams += v,
            _ if outcome("ok") => s.requests[0] = v,
            _ if outcome("error") => s.requests[1] = v,
            _ if outcome("rejected") => s.requests[2] = v,
            _ if outcome("cancelled") => s.requests[3] = v,
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_fill_the_sample() {
        let text = "HTTP/1.1 200 OK\r\n\r\n# HELP x\ncnse_connections_open 3\ncnse_streams{state=\"queued\"} 1\ncnse_streams{state=\"running\"} 2\ncnse_streams{state=\"sending\"} 4\ncnse_requests_total{protocol=\"binary\",outcome=\"cancelled\"} 9\ncnse_requests_total{protocol=\"http\",outcome=\"cancelled\"} 5\n";
        let mut s = Server::default();
        parse_metrics(text, &mut s);
        assert_eq!((s.conns, s.streams, s.requests[3]), (3, 7, 9));
    }

    #[test]
    fn a_csv_row_reads_back() {
        let tally = Tally::default();
        let server = Server {
            rss_kib: 1,
            fds: 2,
            threads: 3,
            conns: 4,
            streams: 5,
            accepted: 6,
            violations: 7,
            tokens_sent: 8,
            requests: [9, 10, 11, 12],
        };
        let s = Sample::new(1.5, Phase::After, server.clone(), &tally);
        let text = format!("{CSV_HEADER}\n{}\n", csv_row(&s));
        let back = parse_csv(&text).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(
            (back[0].server.clone(), back[0].phase, back[0].t_s),
            (server, Phase::After, 1.5)
        );
    }
}
