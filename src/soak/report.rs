//! The soak's summary table: what the population did, the server's levels
//! at the run's landmarks, and the verdict.

use std::fmt::Write as _;

use super::population::ROLES;
use super::sample::{Counts, Phase, Sample};
use super::verdict::{self, Bounds, SERIES};

/// `notes`: lines printed as they are (what was checked, failures).
pub fn summary(seed: u64, samples: &[Sample], counts: Counts, b: Bounds, why: &[String], notes: &[String]) -> String {
    let mut o = String::new();
    let run: Vec<&Sample> = samples.iter().filter(|s| s.phase == Phase::Run).collect();
    let _ = writeln!(
        o,
        "soak summary: seed {seed}, population ran {:.0} s ({} samples), {} samples after",
        run.last().zip(run.first()).map_or(0.0, |(l, f)| l.t_s - f.t_s + 1.0),
        run.len(),
        samples.iter().filter(|s| s.phase == Phase::After).count()
    );
    let Some(last) = samples.last() else {
        let _ = writeln!(o, "no samples");
        return o;
    };
    let _ = writeln!(o, "{:<10} {:>10} {:>8}", "actor", "passed", "failed");
    for (i, r) in ROLES.iter().enumerate() {
        let _ = writeln!(o, "{:<10} {:>10} {:>8}", r.name(), counts.ok[i], counts.failed[i]);
    }
    let v = &last.server;
    let _ = writeln!(
        o,
        "server counters: accepted {} violations {} tokens_sent {} requests ok {} error {} rejected {} cancelled {}",
        v.accepted, v.violations, v.tokens_sent, v.requests[0], v.requests[1], v.requests[2], v.requests[3]
    );
    if run.len() >= verdict::RUN_SAMPLES_MIN {
        let _ = writeln!(
            o,
            "{:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8}",
            "series", "baseline", "plateau", "last-qtr", "max", "end", "slope/min", "margin"
        );
        for s in &SERIES {
            let l = verdict::levels(samples, s, b);
            let (name, k) = if s.name == "RSS" {
                ("RSS (MiB)", 1024.0)
            } else {
                (s.name, 1.0)
            };
            let f = |v: u64| format!("{:.1}", v as f64 / k);
            let _ = writeln!(
                o,
                "{:<13} {:>9} {:>9} {:>9} {:>9} {:>9} {:>+10.2} {:>8}",
                name,
                f(l.baseline),
                f(l.plateau),
                f(l.last_quarter),
                f(l.max),
                f(l.end),
                l.slope_per_min / k,
                f(l.margin)
            );
        }
    }
    for n in notes {
        let _ = writeln!(o, "{n}");
    }
    if why.is_empty() {
        let _ = writeln!(o, "verdict: PASS");
    } else {
        let _ = writeln!(o, "verdict: FAIL ({} reasons)", why.len());
    }
    o
}
