//! Turns the CSV files `scripts/bench.sh` writes into `bench-results/`
//! into `summary.md` (tables, ratios cnse-dp / each peer, the issue's
//! targets met or not) and SVG plots (plotters).
//!
//! ```sh
//! cargo bench --bench bench_report -- bench-results
//! ```
//!
//! Each experiment file has the columns `server,param,value` followed by
//! the load generator's CSV columns (`cnse_metrics::CSV_HEADER`): one row
//! per metric of one run. `server` names who served, `param`/`value` the
//! setting the experiment varies (connections, offered load as a fraction
//! of the server's own closed-loop peak, inflight depth, an ablation's
//! switch).

#[path = "report/plots.rs"]
pub mod plots;
#[path = "report/summary.rs"]
pub mod summary;

use std::collections::BTreeMap;
use std::path::Path;

/// One row: a metric of one run.
#[derive(Clone, Debug)]
pub struct Row {
    pub server: String,
    pub param: String,
    pub value: String,
    pub run: String,
    pub metric: String,
    /// Values recorded (latency) or events in the window (rate).
    pub count: u64,
    /// `mean` column: the rate for `per_s` rows, the mean for latencies.
    pub mean: f64,
    /// p50, p90, p95, p99, p99.9, max (µs); `None` where not measured.
    pub pct: [Option<f64>; 6],
}

/// Index of a percentile in [`Row::pct`].
pub const P50: usize = 0;
pub const P99: usize = 3;
pub const P999: usize = 4;

/// One run, or the median of a run repeated in rounds: every metric row
/// of it.
#[derive(Clone, Debug, Default)]
pub struct Point {
    pub server: String,
    pub param: String,
    pub value: String,
    pub run: String,
    pub metrics: BTreeMap<String, Row>,
    /// Rounds folded into this point (1: a single run).
    pub rounds: usize,
}

impl Point {
    pub fn rate(&self, metric: &str) -> Option<f64> {
        self.metrics.get(metric).map(|r| r.mean)
    }

    /// The latency figures to quote: every measured request (`e2e_all`)
    /// where the run has it, else the answered ones.
    pub fn latency(&self) -> Option<&Row> {
        self.metrics.get("e2e_all").or_else(|| self.metrics.get("e2e"))
    }

    pub fn pct(&self, i: usize) -> Option<f64> {
        self.latency().and_then(|r| r.pct[i])
    }

    /// CPU cores the server / the load generator kept busy (CPU-µs per s).
    pub fn server_cores(&self) -> Option<f64> {
        self.rate("server_cpu").map(|v| v / 1e6)
    }

    pub fn load_cores(&self) -> Option<f64> {
        self.rate("load_cpu").map(|v| v / 1e6)
    }

    /// Frames the server sent per second of its CPU time (per server
    /// core): PONGs, or TOKENS and END frames.
    pub fn frames_per_server_cpu_s(&self) -> Option<f64> {
        let cores = self.server_cores()?;
        (cores > 0.0).then(|| self.rate("frames_in").unwrap_or(0.0) / cores)
    }

    /// The kernel's share of the server's CPU time (its system time over
    /// user and system, from the load generator's `server_kernel_cpu`).
    pub fn server_kernel_share(&self) -> Option<f64> {
        let cpu = self.rate("server_cpu").filter(|c| *c > 0.0)?;
        Some(self.rate("server_kernel_cpu")? / cpu)
    }

    /// Frames per second of the server's kernel time alone: what a server
    /// with no code of its own on the same kernel path would send per
    /// CPU-second, the ceiling of any per-core ratio taken against it.
    pub fn frames_per_server_kernel_cpu_s(&self) -> Option<f64> {
        let kernel = self.rate("server_kernel_cpu")? / 1e6;
        (kernel > 0.0).then(|| self.rate("frames_in").unwrap_or(0.0) / kernel)
    }

    /// The run's mode: the first word of its label (`ping`, `generate`).
    pub fn mode(&self) -> &str {
        self.run.split_whitespace().next().unwrap_or("")
    }

    /// A `key=N` field of the run label (`c`, `k`, `t`).
    pub fn label_num(&self, key: &str) -> Option<f64> {
        self.run
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .and_then(|n| n.parse().ok())
    }

    /// `value` as a number (connections, inflight, a fraction).
    pub fn x(&self) -> Option<f64> {
        self.value.parse().ok()
    }
}

/// `ablation_send_mode.csv` pivoted: its settings are `MODE/PAYLOAD`. The
/// modes in the order they ran, the payloads ascending, and server
/// CPU-µs per request of each (mode, payload) run.
pub struct SendModes {
    pub modes: Vec<String>,
    pub payloads: Vec<u64>,
    cpu_us: BTreeMap<(String, u64), f64>,
}

impl SendModes {
    pub fn of(points: &[Point]) -> Self {
        let mut modes: Vec<String> = Vec::new();
        let mut payloads: Vec<u64> = Vec::new();
        let mut cpu_us = BTreeMap::new();
        for p in points {
            let Some((mode, payload)) = p.value.split_once('/') else {
                continue;
            };
            let Ok(payload) = payload.parse::<u64>() else {
                continue;
            };
            if !modes.iter().any(|m| m == mode) {
                modes.push(mode.to_string());
            }
            if !payloads.contains(&payload) {
                payloads.push(payload);
            }
            if let Some(r) = p.rate("requests_per_server_cpu_s").filter(|r| *r > 0.0) {
                cpu_us.insert((mode.to_string(), payload), 1e6 / r);
            }
        }
        payloads.sort_unstable();
        Self {
            modes,
            payloads,
            cpu_us,
        }
    }

    /// Server CPU-µs per request.
    pub fn cpu_us(&self, mode: &str, payload: u64) -> Option<f64> {
        self.cpu_us.get(&(mode.to_string(), payload)).copied()
    }

    /// `mode`'s CPU per request over the first mode's (plain SEND).
    pub fn ratio(&self, mode: &str, payload: u64) -> Option<f64> {
        Some(self.cpu_us(mode, payload)? / self.cpu_us(self.modes.first()?, payload)?)
    }
}

/// Splits one CSV line (fields may be quoted, with `""` for a quote).
fn split_csv(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// The rows of one experiment file, or none when it was not run.
pub fn load(dir: &Path, file: &str) -> Vec<Row> {
    let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
        return Vec::new();
    };
    let mut rows = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let f = split_csv(line);
        if f.len() != 14 {
            eprintln!("bench_report: {file}: skipping a row of {} fields: {line}", f.len());
            continue;
        }
        let num = |s: &str| s.parse::<f64>().ok();
        rows.push(Row {
            server: f[0].clone(),
            param: f[1].clone(),
            value: f[2].clone(),
            run: f[3].clone(),
            metric: f[4].clone(),
            count: f[6].parse().unwrap_or(0),
            mean: num(&f[7]).unwrap_or(0.0),
            pct: [
                num(&f[8]),
                num(&f[9]),
                num(&f[10]),
                num(&f[11]),
                num(&f[12]),
                num(&f[13]),
            ],
        });
    }
    rows
}

/// Rows grouped into runs, in the order they were written; a run repeated
/// in rounds (`scripts/bench.sh` with `ROUNDS=N` labels them ` r=1`,
/// ` r=2`, ...) becomes one point of the rounds' medians.
pub fn points(rows: &[Row]) -> Vec<Point> {
    let mut runs: Vec<Point> = Vec::new();
    for r in rows {
        let same = |p: &Point| p.server == r.server && p.param == r.param && p.value == r.value && p.run == r.run;
        let i = match runs.iter().position(same) {
            Some(i) => i,
            None => {
                runs.push(Point {
                    server: r.server.clone(),
                    param: r.param.clone(),
                    value: r.value.clone(),
                    run: r.run.clone(),
                    metrics: BTreeMap::new(),
                    rounds: 1,
                });
                runs.len() - 1
            }
        };
        runs[i].metrics.insert(r.metric.clone(), r.clone());
    }
    // Rounds of one run, in the order the first of them was written.
    let mut groups: Vec<Vec<Point>> = Vec::new();
    for mut p in runs {
        p.run = split_round(&p.run).to_string();
        let same = |g: &Vec<Point>| {
            let q = &g[0];
            q.server == p.server && q.param == p.param && q.value == p.value && q.run == p.run
        };
        match groups.iter_mut().find(|g| same(g)) {
            Some(g) => g.push(p),
            None => groups.push(vec![p]),
        }
    }
    groups.into_iter().map(medians).collect()
}

/// A run label without its round (` r=N`, `scripts/bench.sh`'s ROUNDS).
fn split_round(run: &str) -> &str {
    match run.rsplit_once(" r=") {
        Some((label, n)) if n.parse::<u32>().is_ok() => label,
        _ => run,
    }
}

/// The median of `v` (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// The rounds of one run as one point: each metric the median over the
/// rounds that have it (the rate or mean, the count and each percentile
/// on its own).
fn medians(mut rounds: Vec<Point>) -> Point {
    if rounds.len() == 1 {
        return rounds.pop().expect("one round");
    }
    let mut point = rounds[0].clone();
    point.rounds = rounds.len();
    for r in &rounds[1..] {
        for (name, row) in &r.metrics {
            point.metrics.entry(name.clone()).or_insert_with(|| row.clone());
        }
    }
    for (name, row) in point.metrics.iter_mut() {
        let of = |f: &dyn Fn(&Row) -> Option<f64>| {
            median(
                rounds
                    .iter()
                    .filter_map(|r| r.metrics.get(name))
                    .filter_map(f)
                    .collect(),
            )
        };
        row.mean = of(&|r| Some(r.mean)).unwrap_or(0.0);
        row.count = of(&|r| Some(r.count as f64)).unwrap_or(0.0) as u64;
        for i in 0..row.pct.len() {
            row.pct[i] = of(&|r| r.pct[i]);
        }
    }
    point
}

/// Servers in the order they first appear (cnse-dp first by the script).
pub fn servers(points: &[Point]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for p in points {
        if !v.contains(&p.server) {
            v.push(p.server.clone());
        }
    }
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; the directory is the first other word.
    let Some(dir) = args.iter().skip(1).find(|a| !a.starts_with("--")) else {
        eprintln!("bench_report: give the results directory (see the file's header)");
        return;
    };
    let dir = Path::new(dir);
    let plots_written = match plots::write_all(dir) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("bench_report: plotting: {e}");
            std::process::exit(1);
        }
    };
    let md = summary::render(dir, &plots_written);
    let path = dir.join("summary.md");
    if let Err(e) = std::fs::write(&path, md) {
        eprintln!("bench_report: writing {}: {e}", path.display());
        std::process::exit(1);
    }
    println!("wrote {} and {} plots", path.display(), plots_written.len());
}
