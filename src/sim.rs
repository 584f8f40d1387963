//! `cnse-dp sim`: the session layer under deterministic simulation (see
//! `cnse_server::sim`). One seed replays exactly; a range of seeds runs one
//! after another for as long as asked.

use std::time::{Duration, Instant};

use anyhow::bail;
use cnse_server::sim::{run as run_seed, SimConfig};

#[derive(clap::Args)]
pub struct Args {
    /// First seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random steps per seed before the drain phase.
    #[arg(long, default_value_t = 10_000)]
    pub steps: u64,
    /// Seeds to run, starting at --seed.
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    /// Keep running further seeds until this many seconds have passed
    /// (overrides --seeds).
    #[arg(long)]
    pub duration_secs: Option<u64>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let start = Instant::now();
    let until = a.duration_secs.map(|s| start + Duration::from_secs(s));
    let mut seed = a.seed;
    let mut runs = 0u64;
    loop {
        let done = match until {
            Some(t) => Instant::now() >= t,
            None => runs >= a.seeds,
        };
        if done {
            break;
        }
        let r = run_seed(&SimConfig { seed, steps: a.steps })
            .map_err(|f| anyhow::anyhow!("{f}\nreplay: cnse-dp sim --seed {} --steps {}", f.seed, a.steps))?;
        if a.seeds == 1 && until.is_none() {
            println!(
                "seed {}: {} steps, {} clients, {} requests, {} tokens, {} END, {} ERROR, {} violations answered{}, {} ms simulated: every invariant held",
                r.seed,
                r.steps,
                r.clients,
                r.requests,
                r.tokens,
                r.ends,
                r.errors,
                r.violations,
                if r.shutdown { ", shut down" } else { "" },
                r.sim_time_ms
            );
        }
        seed += 1;
        runs += 1;
    }
    if runs != 1 || until.is_some() {
        println!(
            "{runs} seeds ({}..{}) of {} steps: every invariant held ({:.1} s)",
            a.seed,
            seed,
            a.steps,
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
