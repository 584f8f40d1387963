//! One rank's figures for one epoch, as bytes for the trip to rank 0, and
//! the row rank 0 makes of all of them.

use anyhow::{ensure, Result};
use cnse_metrics::LatencyHistogram;

/// Counts of one rank in one epoch (deltas, not totals since start).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RankReport {
    pub rank: u64,
    /// Tasks that arrived here (this rank is their origin).
    pub arrivals: u64,
    /// Tasks this rank's runners served (any origin).
    pub ran: u64,
    /// Sum of `index_hash` over the tasks served here.
    pub ran_hash: u64,
    /// Sum of `index_hash` over this origin's outcomes that carry a result.
    pub done_hash: u64,
    /// Outcomes with a result (the task ran somewhere).
    pub outcomes: u64,
    /// Every last outcome received (with a result or not).
    pub answered: u64,
    /// Results received before a task's last one (streamed).
    pub streamed: u64,
    pub cancelled: u64,
    /// Cancelled while queued here: removed, no outcome.
    pub removed: u64,
    pub lost: u64,
    /// Results out of order or for a task already answered, or not ours.
    pub duplicates: u64,
    /// Tasks a core took from another core's deque.
    pub local_steals: u64,
    pub stolen_in: u64,
    pub stolen_out: u64,
    pub steal_requests: u64,
    pub cancels_sent: u64,
    pub cancels_received: u64,
    pub busy_us: u64,
    pub wall_us: u64,
    /// Sum of the nominal service times of the tasks served here.
    pub nominal_us: u64,
    pub latency: Vec<(u64, u64)>,
}

const FIELDS: usize = 21;

impl RankReport {
    fn fields(&self) -> [u64; FIELDS] {
        [
            self.rank,
            self.arrivals,
            self.ran,
            self.ran_hash,
            self.done_hash,
            self.outcomes,
            self.cancelled,
            self.removed,
            self.lost,
            self.duplicates,
            self.local_steals,
            self.stolen_in,
            self.stolen_out,
            self.steal_requests,
            self.cancels_sent,
            self.cancels_received,
            self.busy_us,
            self.wall_us,
            self.nominal_us,
            self.answered,
            self.streamed,
        ]
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity((FIELDS + 1 + 2 * self.latency.len()) * 8);
        for v in self.fields().into_iter().chain([self.latency.len() as u64]) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for &(v, n) in &self.latency {
            out.extend_from_slice(&v.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        ensure!(
            b.len() & 7 == 0 && b.len() >= (FIELDS + 1) * 8,
            "report of {} bytes",
            b.len()
        );
        let w: Vec<u64> = b
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let pairs = w[FIELDS] as usize;
        ensure!(
            w.len() == FIELDS + 1 + 2 * pairs,
            "report holds {} words for {pairs} pairs",
            w.len()
        );
        let f = &w[..FIELDS];
        Ok(Self {
            rank: f[0],
            arrivals: f[1],
            ran: f[2],
            ran_hash: f[3],
            done_hash: f[4],
            outcomes: f[5],
            cancelled: f[6],
            removed: f[7],
            lost: f[8],
            duplicates: f[9],
            local_steals: f[10],
            stolen_in: f[11],
            stolen_out: f[12],
            steal_requests: f[13],
            cancels_sent: f[14],
            cancels_received: f[15],
            busy_us: f[16],
            wall_us: f[17],
            nominal_us: f[18],
            answered: f[19],
            streamed: f[20],
            latency: w[FIELDS + 1..].chunks_exact(2).map(|p| (p[0], p[1])).collect(),
        })
    }
}

/// One policy's result over all ranks.
#[derive(Debug, Clone)]
pub struct Row {
    pub policy: String,
    pub ranks: usize,
    pub cores_per_rank: usize,
    pub tasks: u64,
    pub task_us: u32,
    pub wall_us: u64,
    pub throughput_tasks_s: f64,
    /// Against one rank: the work rate (nominal task µs served per second)
    /// over ranks × one rank's work rate (a work rate, not tasks/s, so
    /// runs with different service samples compare).
    pub efficiency: f64,
    /// Task Bench's: nominal work / (wall × ranks × cores).
    pub ideal_efficiency: f64,
    pub busy_fraction: f64,
    /// Nominal task µs served per wall second, all ranks.
    pub work_rate: f64,
    pub p50_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub steals: u64,
    pub stolen_between_ranks: u64,
    /// Each task ran exactly once: hashes and counts agree, no duplicate.
    pub exactly_once: bool,
    pub lost_ranks: usize,
    pub per_rank: Vec<RankReport>,
}

impl Row {
    pub fn new(policy: &str, cores: usize, task_us: u32, reports: &[Option<Vec<u8>>]) -> Result<Self> {
        let mut per_rank = Vec::new();
        for r in reports.iter().flatten() {
            per_rank.push(RankReport::decode(r)?);
        }
        let lost_ranks = reports.len() - per_rank.len();
        let ranks = reports.len();
        let sum = |f: fn(&RankReport) -> u64| per_rank.iter().map(f).fold(0u64, u64::wrapping_add);
        let wall_us = per_rank.iter().map(|r| r.wall_us).max().unwrap_or(0).max(1);
        let mut hist = LatencyHistogram::new();
        for r in &per_rank {
            for &(v, n) in &r.latency {
                hist.record_n_us(v, n);
            }
        }
        let slots_us = wall_us as f64 * (ranks * cores) as f64;
        let tasks = sum(|r| r.arrivals);
        // Every task answered once (or removed by its cancel) and none twice;
        // with every rank reporting, the runs add up to the answers too. A
        // rank given up took its run counts with it: then only the answers
        // can be checked.
        let answered_once = sum(|r| r.duplicates) == 0 && sum(|r| r.answered) + sum(|r| r.removed) == tasks;
        let ran_once = sum(|r| r.ran_hash) == sum(|r| r.done_hash) && sum(|r| r.ran) == sum(|r| r.outcomes);
        let exactly_once = answered_once && (ran_once || reports.len() > per_rank.len());
        Ok(Self {
            policy: policy.to_string(),
            ranks,
            cores_per_rank: cores,
            tasks,
            task_us,
            wall_us,
            throughput_tasks_s: tasks as f64 / (wall_us as f64 / 1e6),
            efficiency: f64::NAN,
            ideal_efficiency: sum(|r| r.nominal_us) as f64 / slots_us,
            busy_fraction: sum(|r| r.busy_us) as f64 / slots_us,
            work_rate: sum(|r| r.nominal_us) as f64 / (wall_us as f64 / 1e6),
            p50_us: hist.quantile_us(0.50),
            p95_us: hist.quantile_us(0.95),
            p99_us: hist.quantile_us(0.99),
            steals: sum(|r| r.local_steals) + sum(|r| r.stolen_in),
            stolen_between_ranks: sum(|r| r.stolen_in),
            exactly_once,
            lost_ranks,
            per_rank,
        })
    }
}

pub const CSV_HEADER: &str = "policy,ranks,cores_per_rank,tasks,task_us,service,service_mode,arrival,\
throughput_tasks_s,efficiency,ideal_efficiency,busy_fraction,p50_us,p95_us,p99_us,steals,\
stolen_between_ranks,exactly_once,metg_us";

pub fn csv_line(row: &Row, run: &str, metg_us: Option<u32>) -> String {
    format!(
        "{},{},{},{},{},{run},{:.1},{},{:.4},{:.4},{},{},{},{},{},{},{}",
        row.policy,
        row.ranks,
        row.cores_per_rank,
        row.tasks,
        row.task_us,
        row.throughput_tasks_s,
        // Empty for METG rows: they are measured against the ideal only.
        if row.efficiency.is_finite() {
            format!("{:.4}", row.efficiency)
        } else {
            String::new()
        },
        row.ideal_efficiency,
        row.busy_fraction,
        row.p50_us,
        row.p95_us,
        row.p99_us,
        row.steals,
        row.stolen_between_ranks,
        row.exactly_once,
        metg_us.map(|m| m.to_string()).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trip_and_bad_bytes() {
        let r = RankReport {
            rank: 3,
            arrivals: 10,
            ran: 9,
            latency: vec![(5, 2), (900, 1)],
            ..Default::default()
        };
        assert_eq!(RankReport::decode(&r.encode()).unwrap(), r);
        assert!(RankReport::decode(&[1, 2, 3]).is_err());
        let mut b = r.encode();
        b.truncate(b.len() - 8);
        assert!(RankReport::decode(&b).is_err());
    }
}
