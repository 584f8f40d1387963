//! The soak's verdict, pure over the samples: a good stream lost,
//! duplicated or wrong fails the run; so does a level that grows without
//! bound while the population runs, or one that does not come back once it
//! has stopped. The rules (docs/RELIABILITY.md, "Soak"):
//!
//! - the run's samples are cut in quarters; the first is warm-up. A series
//!   grows without bound when the median of the last quarter exceeds the
//!   median of the second by more than its margin, or when the
//!   least-squares slope over the last three quarters, times their span,
//!   does;
//! - after the population stops the server gets [`SETTLE_S`] seconds:
//!   then connections must be at the baseline, no stream open, descriptors
//!   within [`FDS_BACK_TOLERANCE`] of the baseline and RSS within its
//!   margin of the plateau (the second quarter's median).

use super::population::{Role, ROLES};
use super::sample::{Counts, Phase, Sample};

/// Seconds the server gets to let go after the population stops.
pub const SETTLE_S: u64 = 10;
/// Descriptors allowed above the baseline at the end.
pub const FDS_BACK_TOLERANCE: u64 = 2;
/// RSS margin: this fraction of the plateau, and at least
/// [`RSS_MARGIN_MIN_KIB`].
pub const RSS_MARGIN_FRACTION: f64 = 0.10;
pub const RSS_MARGIN_MIN_KIB: u64 = 8 * 1024;
/// Fewest run samples a growth verdict is drawn from.
pub const RUN_SAMPLES_MIN: usize = 8;

/// A watched series and its margin.
#[derive(Debug, Clone, Copy)]
pub struct Series {
    pub name: &'static str,
    pub get: fn(&Sample) -> u64,
    pub unit: &'static str,
}

pub const SERIES: [Series; 4] = [
    Series {
        name: "RSS",
        get: |s| s.server.rss_kib,
        unit: "KiB",
    },
    Series {
        name: "fds",
        get: |s| s.server.fds,
        unit: "",
    },
    Series {
        name: "connections",
        get: |s| s.server.conns,
        unit: "",
    },
    Series {
        name: "open streams",
        get: |s| s.server.streams,
        unit: "",
    },
];

/// The levels of one series at the run's landmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Levels {
    pub baseline: u64,
    /// Median of the run's second quarter.
    pub plateau: u64,
    /// Median of the run's last quarter.
    pub last_quarter: u64,
    pub max: u64,
    /// The last sample after the population stopped.
    pub end: u64,
    /// Least-squares slope over the last three quarters, per minute.
    pub slope_per_min: f64,
    pub margin: u64,
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// Least-squares slope of (t, y), per second.
fn slope(pts: &[(f64, f64)]) -> f64 {
    let n = pts.len() as f64;
    if pts.len() < 2 {
        return 0.0;
    }
    let (mx, my) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in pts {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
    }
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx
    }
}

/// Margins of the count series: the most the population can hold at once
/// (it is bounded), so a swing of the load is not growth.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections the population holds at most at once (plus the scrape).
    pub conns_max: u64,
    /// Streams the population holds open at most at once.
    pub streams_max: u64,
}

pub fn levels(samples: &[Sample], s: &Series, b: Bounds) -> Levels {
    let of = |p: Phase| samples.iter().filter(move |x| x.phase == p);
    let run: Vec<&Sample> = of(Phase::Run).collect();
    let n = run.len();
    let vals = |r: &[&Sample]| r.iter().map(|x| (s.get)(x)).collect::<Vec<u64>>();
    let plateau = median(vals(&run[n / 4..n / 2]));
    let fit: Vec<(f64, f64)> = run[n / 4..].iter().map(|x| (x.t_s, (s.get)(x) as f64)).collect();
    let margin = match s.name {
        "RSS" => RSS_MARGIN_MIN_KIB.max((plateau as f64 * RSS_MARGIN_FRACTION) as u64),
        "open streams" => b.streams_max,
        _ => b.conns_max,
    };
    Levels {
        baseline: of(Phase::Baseline).next_back().map_or(0, |x| (s.get)(x)),
        plateau,
        last_quarter: median(vals(&run[n * 3 / 4..])),
        max: samples.iter().map(|x| (s.get)(x)).max().unwrap_or(0),
        end: of(Phase::After).next_back().map_or(0, |x| (s.get)(x)),
        slope_per_min: slope(&fit) * 60.0,
        margin,
    }
}

/// Every reason the run failed (empty: it passed). `last` is the
/// population's final count: it goes on after the last sample when the
/// server dies.
pub fn verdict(samples: &[Sample], last: Counts, b: Bounds, server_alive: bool) -> Vec<String> {
    let mut why = Vec::new();
    if !server_alive {
        why.push("the server process died during the run".to_string());
    }
    for (i, r) in ROLES.iter().enumerate() {
        if last.failed[i] > 0 {
            let what = match r {
                Role::Good | Role::Slow => "streams lost, duplicated or wrong",
                Role::Canceller => "cancelled streams without the right END",
                Role::Garbage => "garbage connections not answered with ERROR and a close",
                Role::Churn => "churn connections that failed",
            };
            why.push(format!("{} {what}: {}", last.failed[i], r.name()));
        }
        if last.ok[i] == 0 {
            why.push(format!("no {} actor completed anything: nothing was checked", r.name()));
        }
    }
    if samples.is_empty() {
        why.push("no sample was taken".to_string());
        return why;
    }
    let run = samples.iter().filter(|s| s.phase == Phase::Run).count();
    if run < RUN_SAMPLES_MIN {
        why.push(format!(
            "{run} samples while the population ran: too few to judge growth (need {RUN_SAMPLES_MIN})"
        ));
        return why;
    }
    for s in &SERIES {
        let l = levels(samples, s, b);
        let span_min = run_span_min(samples);
        let trend = l.slope_per_min * span_min * 0.75;
        if l.last_quarter > l.plateau + l.margin {
            why.push(format!(
                "{} grew: median {} {} in the second quarter, {} in the last (margin {})",
                s.name, l.plateau, s.unit, l.last_quarter, l.margin
            ));
        } else if trend > l.margin as f64 {
            why.push(format!(
                "{} trends up: {:+.1} {}/min over the last three quarters, {trend:.0} in all (margin {})",
                s.name, l.slope_per_min, s.unit, l.margin
            ));
        }
        let back = match s.name {
            "RSS" => l.end <= l.plateau + l.margin,
            "fds" => l.end <= l.baseline + FDS_BACK_TOLERANCE,
            _ => l.end <= l.baseline,
        };
        if !back {
            why.push(format!(
                "{} not back {SETTLE_S} s after the population stopped: {} {} (baseline {}, plateau {})",
                s.name, l.end, s.unit, l.baseline, l.plateau
            ));
        }
    }
    why
}

fn run_span_min(samples: &[Sample]) -> f64 {
    let mut run = samples.iter().filter(|s| s.phase == Phase::Run);
    match (run.next(), run.next_back()) {
        (Some(a), Some(b)) => (b.t_s - a.t_s) / 60.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::super::population::Tally;
    use super::super::sample::Server;
    use super::*;

    const B: Bounds = Bounds {
        conns_max: 12,
        streams_max: 30,
    };

    /// A run of `n` seconds whose RSS is `rss(t)`; fds and connections
    /// swing with the load and come back; every role passed.
    fn run(n: usize, rss: impl Fn(f64) -> u64, end_fds: u64) -> Vec<Sample> {
        let tally = Tally::default();
        let mut v = Vec::new();
        let mk = |t: f64, phase, rss_kib, fds, conns| {
            let mut s = Sample::new(
                t,
                phase,
                Server {
                    rss_kib,
                    fds,
                    conns,
                    ..Server::default()
                },
                &tally,
            );
            s.ok = [5; 5];
            s
        };
        v.push(mk(0.0, Phase::Baseline, 20_000, 20, 1));
        for i in 0..n {
            let t = 1.0 + i as f64;
            let swing = (i % 7) as u64;
            v.push(mk(t, Phase::Run, rss(t), 25 + swing, 5 + swing));
        }
        v.push(mk(n as f64 + 2.0, Phase::After, rss(n as f64), end_fds, 1));
        v
    }

    fn judge(s: &[Sample]) -> Vec<String> {
        verdict(s, s.last().unwrap().counts(), B, true)
    }

    #[test]
    fn a_flat_run_that_comes_back_passes() {
        let s = run(120, |t| 60_000 + (t as u64 % 5) * 100, 20);
        assert_eq!(judge(&s), Vec::<String>::new());
    }

    #[test]
    fn a_warm_up_climb_then_a_plateau_passes() {
        let s = run(120, |t| 30_000 + (t.min(20.0) as u64) * 1_500, 21);
        assert_eq!(judge(&s), Vec::<String>::new());
    }

    #[test]
    fn a_steady_rss_leak_fails() {
        // 1 MiB a second: 90 MiB over the last three quarters.
        let s = run(120, |t| 60_000 + t as u64 * 1024, 20);
        let why = judge(&s);
        assert!(why.iter().any(|w| w.starts_with("RSS grew")), "{why:?}");
    }

    #[test]
    fn descriptors_not_back_fail() {
        let s = run(120, |_| 60_000, 40);
        let why = judge(&s);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("fds not back"), "{why:?}");
    }

    #[test]
    fn a_lost_stream_fails_and_is_counted() {
        let mut s = run(120, |_| 60_000, 20);
        s.last_mut().unwrap().failed[Role::Good as usize] = 2;
        let why = judge(&s);
        assert_eq!(why, vec!["2 streams lost, duplicated or wrong: good".to_string()]);
    }

    #[test]
    fn streams_lost_after_the_last_sample_count() {
        // The server died: the samples stop, the population's count goes on.
        let s = run(120, |_| 60_000, 20);
        let mut last = s.last().unwrap().counts();
        last.failed[Role::Good as usize] = 7;
        let why = verdict(&s, last, B, false);
        assert_eq!(
            why,
            vec![
                "the server process died during the run".to_string(),
                "7 streams lost, duplicated or wrong: good".to_string()
            ]
        );
    }

    #[test]
    fn a_too_short_run_is_not_a_pass() {
        let s = run(4, |_| 60_000, 20);
        assert!(judge(&s).iter().any(|w| w.contains("too few")));
    }
}
