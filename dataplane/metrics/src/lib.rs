//! Latency histograms, tables and CSV for cnse-dp.
//!
//! Client threads each own their histograms (recording is a few array
//! increments, no locks, no allocation); the run merges them at the end and
//! turns them into [`Summary`] rows for the table and the CSV file.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency a histogram tracks exactly: one hour in µs. Larger values
/// saturate to it (a run that long is broken anyway, and the table shows it).
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits kept: 0.1% relative error per value.
pub const SIGNIFICANT_DIGITS: u8 = 3;

/// The percentiles reported, as (column name, quantile).
pub const PERCENTILES: [(&str, f64); 5] = [
    ("p50", 0.50),
    ("p90", 0.90),
    ("p95", 0.95),
    ("p99", 0.99),
    ("p99.9", 0.999),
];

/// Columns of the CSV file, one row per metric:
///
/// - `run`: the label of the run (mode, load shape) given by the caller;
/// - `metric`: `ttft`, `inter_token`, `e2e`, ... for latencies;
///   `requests_per_s`, `tokens_per_s`, `frames_per_s`, ... for rates;
/// - `unit`: `us` for latencies, `per_s` for rates;
/// - `count`: values recorded (latencies) or events in the window (rates);
/// - `mean`: mean latency in µs, or the rate itself;
/// - `p50`,`p90`,`p95`,`p99`,`p99_9`,`max`: latency percentiles in µs
///   (empty for rates).
pub const CSV_HEADER: &str = "run,metric,unit,count,mean,p50,p90,p95,p99,p99_9,max";

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("merging histograms: {0}")]
    Merge(String),
    #[error("writing CSV {path}: {source}")]
    Csv {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A latency distribution in microseconds.
#[derive(Clone)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count())
            .field("max_us", &self.max_us())
            .finish()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
            .expect("constant bounds are valid: 1 <= low, high >= 2 * low, sigfig <= 5");
        Self { hist }
    }

    /// Records one value; never allocates (the histogram is sized at
    /// creation and values above the bound saturate).
    #[inline]
    pub fn record_us(&mut self, value_us: u64) {
        self.hist.saturating_record(value_us.min(LATENCY_US_MAX));
    }

    #[inline]
    pub fn record(&mut self, value: Duration) {
        self.record_us(u64::try_from(value.as_micros()).unwrap_or(LATENCY_US_MAX));
    }

    /// Records `n` equal values at once.
    #[inline]
    pub fn record_n_us(&mut self, value_us: u64, n: u64) {
        self.hist.saturating_record_n(value_us.min(LATENCY_US_MAX), n);
    }

    /// Records one value with HdrHistogram's coordinated-omission
    /// correction: when `value_us` exceeds `expected_interval_us`, the
    /// samples a stalled sender would have taken meanwhile are added too.
    pub fn record_corrected_us(&mut self, value_us: u64, expected_interval_us: u64) {
        let v = value_us.min(LATENCY_US_MAX);
        if self.hist.record_correct(v, expected_interval_us).is_err() {
            self.hist.saturating_record(v);
        }
    }

    /// Adds every value of `other` to this one (per-thread histograms into
    /// the run's).
    pub fn merge(&mut self, other: &LatencyHistogram) -> Result<(), MetricsError> {
        self.hist
            .add(&other.hist)
            .map_err(|e| MetricsError::Merge(format!("{e:?}")))
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    pub fn mean_us(&self) -> f64 {
        if self.count() == 0 {
            0.0
        } else {
            self.hist.mean()
        }
    }

    pub fn max_us(&self) -> u64 {
        self.hist.max()
    }

    pub fn min_us(&self) -> u64 {
        self.hist.min()
    }

    /// Value at quantile `q` in [0, 1]; 0 for an empty histogram.
    pub fn quantile_us(&self, q: f64) -> u64 {
        assert!((0.0..=1.0).contains(&q), "quantile {q} outside [0, 1]");
        if self.count() == 0 {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    /// Every recorded value with its count, to rebuild the histogram
    /// elsewhere (another MPI rank) with [`LatencyHistogram::record_n_us`].
    pub fn recorded(&self) -> Vec<(u64, u64)> {
        self.hist
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn clear(&mut self) {
        self.hist.reset();
    }

    pub fn summary(&self, metric: &str) -> Summary {
        Summary {
            metric: metric.to_string(),
            count: self.count(),
            mean_us: self.mean_us(),
            p50_us: self.quantile_us(0.50),
            p90_us: self.quantile_us(0.90),
            p95_us: self.quantile_us(0.95),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: self.max_us(),
        }
    }
}

/// The reported figures of one latency distribution.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub metric: String,
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p95_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

/// A throughput figure: `count` events over `window`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rate {
    pub metric: String,
    pub count: u64,
    pub window: Duration,
}

impl Rate {
    pub fn new(metric: &str, count: u64, window: Duration) -> Self {
        Self {
            metric: metric.to_string(),
            count,
            window,
        }
    }

    pub fn per_s(&self) -> f64 {
        let s = self.window.as_secs_f64();
        if s > 0.0 {
            self.count as f64 / s
        } else {
            0.0
        }
    }
}

/// Formats microseconds with a unit that keeps 3-4 significant digits.
pub fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0}µs")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

/// Formats a rate with thousands separators (`1,234,567/s`).
pub fn fmt_rate(per_s: f64) -> String {
    let whole = per_s.round() as u64;
    let digits = whole.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 2);
    // The leading group holds 1 to 3 digits, every later group exactly 3.
    let head = match digits.len() % 3 {
        0 => 3.min(digits.len()),
        n => n,
    };
    out.push_str(&digits[..head]);
    for group in digits.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.push_str(std::str::from_utf8(group).expect("ASCII digits"));
    }
    out.push_str("/s");
    out
}

/// The fixed-width latency table followed by the rates:
///
/// ```text
/// latency             count      mean       p50       p90       p95       p99     p99.9       max
/// ttft                12000   20.41ms   20.30ms   20.80ms   21.20ms   21.90ms   23.10ms   24.00ms
/// ...
/// requests          12000  1,200/s
/// ```
pub fn render_table(latencies: &[Summary], rates: &[Rate]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "count", "mean", "p50", "p90", "p95", "p99", "p99.9", "max"
    );
    for l in latencies {
        if l.count == 0 {
            // Nothing recorded: no figure, rather than zeros that read as data.
            let _ = writeln!(s, "{:<16} {:>10} {:>9}", l.metric, 0, "-");
            continue;
        }
        let _ = writeln!(
            s,
            "{:<16} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            l.metric,
            l.count,
            fmt_us(l.mean_us),
            fmt_us(l.p50_us as f64),
            fmt_us(l.p90_us as f64),
            fmt_us(l.p95_us as f64),
            fmt_us(l.p99_us as f64),
            fmt_us(l.p999_us as f64),
            fmt_us(l.max_us as f64),
        );
    }
    if !rates.is_empty() {
        let _ = writeln!(s, "{:<16} {:>10} {:>14}", "throughput", "count", "rate");
        for r in rates {
            let _ = writeln!(s, "{:<16} {:>10} {:>14}", r.metric, r.count, fmt_rate(r.per_s()));
        }
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV rows (without header) of one run; see [`CSV_HEADER`].
pub fn csv_rows(run: &str, latencies: &[Summary], rates: &[Rate]) -> String {
    let run = csv_field(run);
    let mut s = String::new();
    for l in latencies {
        if l.count == 0 {
            let _ = writeln!(s, "{run},{},us,0,,,,,,,", csv_field(&l.metric));
            continue;
        }
        let _ = writeln!(
            s,
            "{run},{},us,{},{:.1},{},{},{},{},{},{}",
            csv_field(&l.metric),
            l.count,
            l.mean_us,
            l.p50_us,
            l.p90_us,
            l.p95_us,
            l.p99_us,
            l.p999_us,
            l.max_us
        );
    }
    for r in rates {
        let _ = writeln!(
            s,
            "{run},{},per_s,{},{:.1},,,,,,",
            csv_field(&r.metric),
            r.count,
            r.per_s()
        );
    }
    s
}

/// Writes `CSV_HEADER` and the given rows (from [`csv_rows`]) to `path`,
/// replacing the file.
pub fn write_csv(path: &Path, rows: &str) -> Result<(), MetricsError> {
    let err = |source| MetricsError::Csv {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(err)?;
    f.write_all(CSV_HEADER.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.write_all(rows.as_bytes()).map_err(err)?;
    f.flush().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_rebuilds_the_histogram() {
        let mut a = LatencyHistogram::new();
        for v in [1, 5, 5, 900, 120_000] {
            a.record_us(v);
        }
        let mut b = LatencyHistogram::new();
        for (v, n) in a.recorded() {
            b.record_n_us(v, n);
        }
        assert_eq!(b.count(), 5);
        assert_eq!(a.quantile_us(0.5), b.quantile_us(0.5));
        assert_eq!(a.max_us(), b.max_us());
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let mut h = LatencyHistogram::new();
        for v in 1..=10_000u64 {
            h.record_us(v);
        }
        let s = h.summary("e2e");
        assert_eq!(s.count, 10_000);
        assert!((s.mean_us - 5_000.5).abs() < 10.0, "{}", s.mean_us);
        // 3 significant digits: within 0.1% of the exact value.
        for (got, want) in [
            (s.p50_us, 5_000),
            (s.p90_us, 9_000),
            (s.p95_us, 9_500),
            (s.p99_us, 9_900),
            (s.p999_us, 9_990),
        ] {
            assert!(got.abs_diff(want) <= want / 1000 + 1, "{got} vs {want}");
        }
        assert!(s.max_us.abs_diff(10_000) <= 10);
    }

    #[test]
    fn zero_and_huge_values_are_recorded() {
        let mut h = LatencyHistogram::new();
        h.record_us(0);
        h.record_us(u64::MAX);
        assert_eq!(h.count(), 2);
        assert_eq!(h.quantile_us(0.0), 0);
        assert!(h.max_us() >= LATENCY_US_MAX - LATENCY_US_MAX / 1000);
    }

    #[test]
    fn merge_across_threads_equals_one_histogram() {
        let parts: Vec<LatencyHistogram> = (0..4u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let mut h = LatencyHistogram::new();
                    for v in 0..1000u64 {
                        h.record_us(t * 1000 + v + 1);
                    }
                    h
                })
                .join()
                .unwrap()
            })
            .collect();
        let mut all = LatencyHistogram::new();
        for p in &parts {
            all.merge(p).unwrap();
        }
        let mut one = LatencyHistogram::new();
        for v in 1..=4000u64 {
            one.record_us(v);
        }
        assert_eq!(all.summary("x"), one.summary("x"));
    }

    #[test]
    fn coordinated_omission_correction_adds_missed_samples() {
        let mut h = LatencyHistogram::new();
        // One 100 ms stall at an expected 10 ms interval: the sender missed
        // 9 samples of 90, 80, ..., 10 ms.
        h.record_corrected_us(100_000, 10_000);
        assert_eq!(h.count(), 10);
        assert!(h.quantile_us(0.5).abs_diff(50_000) < 100);
    }

    #[test]
    fn table_and_csv_shapes() {
        let mut h = LatencyHistogram::new();
        h.record_us(1500);
        let lat = [h.summary("ttft")];
        let rates = [Rate::new("requests", 2_500_000, Duration::from_secs(2))];
        let t = render_table(&lat, &rates);
        assert!(t.contains("1.50ms"), "{t}");
        assert!(t.contains("1,250,000/s"), "{t}");
        for (v, want) in [
            (0.0, "0/s"),
            (999.4, "999/s"),
            (1000.0, "1,000/s"),
            (123456.0, "123,456/s"),
        ] {
            assert_eq!(fmt_rate(v), want);
        }
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0].len(), lines[0].trim_end().len());
        // Every percentile the page promises has a column, in order.
        let head: Vec<&str> = lines[0].split_whitespace().collect();
        assert_eq!(
            head,
            ["latency", "count", "mean", "p50", "p90", "p95", "p99", "p99.9", "max"]
        );
        assert_eq!(lines[1].split_whitespace().count(), head.len());
        // An empty distribution shows no figures, not zeros.
        let empty = LatencyHistogram::new().summary("inter_token");
        let t_empty = render_table(std::slice::from_ref(&empty), &[]);
        assert_eq!(
            t_empty.lines().nth(1).unwrap().split_whitespace().collect::<Vec<_>>(),
            ["inter_token", "0", "-"]
        );
        assert_eq!(csv_rows("r", &[empty], &[]), "r,inter_token,us,0,,,,,,,\n");
        let csv = csv_rows("ping,c=1", &lat, &rates);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 2);
        let cols = CSV_HEADER.split(',').count();
        assert_eq!(rows[0], "\"ping,c=1\",ttft,us,1,1500.0,1500,1500,1500,1500,1500,1500");
        assert_eq!(rows[1], "\"ping,c=1\",requests,per_s,2500000,1250000.0,,,,,,");
        assert_eq!(rows[0].split(',').count(), cols + 1, "quoted run label holds one comma");
        assert_eq!(rows[1].split(',').count(), cols + 1, "quoted run label holds one comma");
        let dir = std::env::temp_dir().join(format!("cnse-metrics-{}.csv", std::process::id()));
        write_csv(&dir, &csv).unwrap();
        let back = std::fs::read_to_string(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        assert!(back.starts_with(CSV_HEADER));
        assert_eq!(back.lines().count(), 3);
    }
}
