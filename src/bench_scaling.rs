//! `cnse-dp bench-scaling`: synthetic tasks through the work-stealing
//! scheduler, alone or across MPI ranks (`mpirun -np N cnse-dp
//! bench-scaling ...`, built with `--features mpi`). Rank 0 prints one line
//! per rank and policy, the summary table and the CSV. Design and
//! measurements: docs/SCHEDULER.md.

mod epoch;
mod report;
mod task;
mod world;

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use epoch::{Plan, SchedCore};
use report::{csv_line, Row, CSV_HEADER};
use task::{Service, ServiceMode};
use world::{Shared, World};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arrival {
    /// Task i arrives at rank i mod R.
    Uniform,
    /// Every task arrives at rank 0.
    Rank0,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Idle cores steal from each other, idle ranks steal half a busy rank's queue.
    Steal,
    /// A priori partition: task i runs on rank i mod R, core (i / R) mod C; no stealing.
    Static,
    /// No balancing: a task runs on the core it arrived at.
    None,
    /// steal, static and none in turn, one CSV row each.
    All,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Tasks in the run (all ranks together).
    #[arg(long, default_value_t = 4000)]
    tasks: u64,
    /// Mean task length in µs.
    #[arg(long, default_value_t = 1000)]
    task_us: u32,
    #[arg(long, value_enum, default_value_t = Service::Constant)]
    service: Service,
    #[arg(long, value_enum, default_value_t = ServiceMode::Wait)]
    service_mode: ServiceMode,
    #[arg(long, value_enum, default_value_t = Arrival::Uniform)]
    arrival: Arrival,
    #[arg(long, value_enum, default_value_t = Policy::All)]
    policy: Policy,
    /// Runner threads (cores) per rank.
    #[arg(long, default_value_t = 1)]
    cores: usize,
    /// Admission bound per rank (queued tasks); arrivals wait beyond it.
    #[arg(long, default_value_t = 4096)]
    queued_max: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Cancel every N-th task once its core has pushed all and its rank
    /// has run 20 tasks (0: none).
    #[arg(long, default_value_t = 0)]
    cancel_every: u64,
    /// Also sweep task sizes (µs, comma-separated) with the steal policy
    /// and report METG: the smallest size at >= 50 % efficiency.
    #[arg(long, value_delimiter = ',')]
    metg_us: Vec<u32>,
    /// Tasks per METG size.
    #[arg(long, default_value_t = 4000)]
    metg_tasks: u64,
    /// Results each task streams back while it runs (the last ends it).
    #[arg(long, default_value_t = 1)]
    results_per_task: u32,
    /// Exit non-zero unless every run ran each task exactly once (tests).
    #[arg(long)]
    check: bool,
    /// A rank silent this long is given up (its tasks end Lost).
    #[arg(long, default_value_t = 5000)]
    dead_after_ms: u64,
    /// Test: this rank's communication thread goes silent for
    /// --test-freeze-ms after its first stolen batch (a hung node).
    #[arg(long)]
    test_freeze_rank: Option<usize>,
    #[arg(long, default_value_t = 3000)]
    test_freeze_ms: u64,
    /// Test: this rank's process exits (status 17) once it has run 20
    /// tasks of the first stealing run (a crashed node).
    #[arg(long)]
    test_exit_rank: Option<usize>,
    /// In a build with --features mpi: run alone, without initialising MPI.
    #[arg(long)]
    no_mpi: bool,
    #[arg(long)]
    csv: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    ensure!(a.tasks >= 1, "--tasks must be >= 1");
    ensure!(a.cores >= 1 && a.cores <= 1024, "--cores must be in 1..=1024");
    ensure!(
        a.queued_max >= 1 && a.queued_max <= 1 << 19,
        "--queued-max must be in 1..=524288"
    );
    ensure!(
        a.tasks <= 1 << 28 && a.metg_tasks <= 1 << 28,
        "--tasks and --metg-tasks must be <= 2^28"
    );
    ensure!(a.metg_us.iter().all(|&s| s >= 1), "--metg-us sizes must be >= 1");
    ensure!(
        (1..=1024).contains(&a.results_per_task),
        "--results-per-task must be in 1..=1024"
    );
    ensure!(a.dead_after_ms >= 1, "--dead-after-ms must be >= 1");
    let tuning = world::Tuning {
        dead_after_ms: a.dead_after_ms,
        freeze_rank: a.test_freeze_rank,
        freeze_ms: a.test_freeze_ms,
    };
    let (world, shared, cores) = World::start(a.cores, a.queued_max, cfg!(feature = "mpi") && !a.no_mpi, tuning)?;
    let result = run_all(&a, &world, &shared, cores);
    world.shutdown();
    result
}

fn run_all(a: &Args, world: &World, shared: &Shared, mut cores: Vec<SchedCore>) -> Result<()> {
    let ranks = world.ranks();
    let rank = world.rank();
    let base = epoch_row(
        a,
        world,
        shared,
        &mut cores,
        "one-rank",
        a.task_us,
        a.tasks.div_ceil(ranks as u64),
        true,
    )?;
    let policies: &[Policy] = match a.policy {
        Policy::All => &[Policy::Steal, Policy::Static, Policy::None],
        p => std::slice::from_ref(match p {
            Policy::Steal => &Policy::Steal,
            Policy::Static => &Policy::Static,
            _ => &Policy::None,
        }),
    };
    // A run that cannot start (a rank was given up: no collective can
    // follow) ends the sequence; what ran so far is still reported.
    let mut stopped = None;
    let mut rows = Vec::new();
    for &p in policies {
        let name = format!("{p:?}").to_lowercase();
        match epoch_row(a, world, shared, &mut cores, &name, a.task_us, a.tasks, false) {
            Ok(row) => rows.push(row),
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }
    let mut metg_rows = Vec::new();
    for &size in a.metg_us.iter().filter(|_| stopped.is_none()) {
        match epoch_row(a, world, shared, &mut cores, "metg-steal", size, a.metg_tasks, false) {
            Ok(row) => metg_rows.push(row),
            Err(e) => {
                stopped = Some(e);
                break;
            }
        }
    }
    let reported = report(a, ranks, rank, base, rows, metg_rows);
    match stopped {
        Some(e) => Err(e.context("the run stopped early")),
        None => reported,
    }
}

/// Rank 0: the table, the CSV and the `--check` verdict.
fn report(
    a: &Args,
    ranks: usize,
    rank: usize,
    base: Option<Row>,
    rows: Vec<Option<Row>>,
    metg_rows: Vec<Option<Row>>,
) -> Result<()> {
    if rank != 0 {
        return Ok(());
    }
    let (Some(base), true) = (base, rows.iter().all(Option::is_some)) else {
        return Ok(());
    };
    let rate1 = base.work_rate;
    let mut rows: Vec<Row> = rows.into_iter().flatten().collect();
    for r in rows.iter_mut() {
        r.efficiency = r.work_rate / (ranks as f64 * rate1);
    }
    let metg_rows: Vec<Row> = metg_rows.into_iter().flatten().collect();
    let metg = metg_rows
        .iter()
        .filter(|r| r.ideal_efficiency >= 0.5)
        .map(|r| r.task_us)
        .min();
    print_rows(a, &base, &rows, &metg_rows, metg);
    if let Some(path) = &a.csv {
        write_csv(a, path, &rows, &metg_rows, metg)?;
    }
    if a.check {
        let bad: Vec<&str> = rows
            .iter()
            .chain(&metg_rows)
            .filter(|r| !r.exactly_once)
            .map(|r| r.policy.as_str())
            .collect();
        ensure!(
            bad.is_empty(),
            "a task did not run exactly once under: {}",
            bad.join(", ")
        );
    }
    Ok(())
}

/// One epoch with a plan for this rank; rank 0 gets the row.
#[allow(clippy::too_many_arguments)]
fn epoch_row(
    a: &Args,
    world: &World,
    shared: &Shared,
    cores: &mut Vec<SchedCore>,
    policy: &str,
    task_us: u32,
    tasks: u64,
    baseline: bool,
) -> Result<Option<Row>> {
    let (ranks, rank, c) = (world.ranks() as u64, world.rank() as u64, a.cores as u64);
    let steal = policy == "steal" || policy == "metg-steal";
    let partition = policy == "static";
    let mut arrivals = vec![Vec::new(); a.cores];
    for i in 0..tasks {
        let (r, core) = if baseline {
            (0, i % c)
        } else if partition || a.arrival == Arrival::Uniform {
            (i % ranks, (i / ranks) % c)
        } else {
            (0, i % c)
        };
        if r == rank {
            arrivals[core as usize].push(i);
        }
    }
    let plan = Plan {
        arrivals,
        task_us,
        seed: a.seed,
        service: a.service,
        mode: a.service_mode,
        // One rank's baseline is its best: its cores steal from each other.
        local_steal: steal || baseline,
        cancel_every: if baseline { 0 } else { a.cancel_every },
        index_end: tasks,
        results_per_task: a.results_per_task,
        exit_after_runs: (steal && a.test_exit_rank == Some(world.rank())).then_some(20),
    };
    let taken = std::mem::take(cores);
    let (back, report) = epoch::run(world, shared, taken, &plan, steal && !baseline)?;
    *cores = back;
    let reports = world.end(report.encode())?;
    if rank != 0 {
        return Ok(None);
    }
    let row = Row::new(policy, a.cores, task_us, &reports)?;
    for r in &row.per_rank {
        println!(
            "{policy:>10} rank {:>3}: arrivals {:>7} ran {:>7} steals local {:>6} in {:>6} out {:>6} busy {:>5.1}% cancels sent {} received {} lost {} streamed {}",
            r.rank, r.arrivals, r.ran, r.local_steals, r.stolen_in, r.stolen_out,
            100.0 * r.busy_us as f64 / (r.wall_us.max(1) as f64 * a.cores as f64),
            r.cancels_sent, r.cancels_received, r.lost, r.streamed
        );
    }
    Ok(Some(row))
}

fn print_rows(a: &Args, base: &Row, rows: &[Row], metg_rows: &[Row], metg: Option<u32>) {
    println!(
        "one rank: {:.0} tasks/s ({} tasks of {} µs in {:.3} s, {:?} {:?}, {} core(s))",
        base.throughput_tasks_s,
        base.tasks,
        a.task_us,
        base.wall_us as f64 / 1e6,
        a.service,
        a.service_mode,
        a.cores
    );
    println!(
        "{:<11}{:>6}{:>9}{:>13}{:>8}{:>8}{:>7}{:>9}{:>9}{:>9}{:>8}{:>7}",
        "policy", "ranks", "tasks", "tasks/s", "eff", "ideal", "busy", "p50 µs", "p95 µs", "p99 µs", "steals", "once"
    );
    for r in rows.iter().chain(metg_rows) {
        println!(
            "{:<11}{:>6}{:>9}{:>13.0}{:>8}{:>8.3}{:>7.2}{:>9}{:>9}{:>9}{:>8}{:>7}",
            if r.policy == "metg-steal" {
                format!("steal@{}", r.task_us)
            } else {
                r.policy.clone()
            },
            r.ranks,
            r.tasks,
            r.throughput_tasks_s,
            if r.efficiency.is_finite() {
                format!("{:.3}", r.efficiency)
            } else {
                "-".into()
            },
            r.ideal_efficiency,
            r.busy_fraction,
            r.p50_us,
            r.p95_us,
            r.p99_us,
            r.steals,
            r.exactly_once
        );
    }
    for r in rows.iter().chain(metg_rows).filter(|r| r.lost_ranks > 0) {
        println!(
            "{}: {} rank(s) given up (silent); their tasks ended Lost",
            r.policy, r.lost_ranks
        );
    }
    if !metg_rows.is_empty() {
        match metg {
            Some(m) => println!("METG (50 % efficiency): {m} µs"),
            None => println!("METG (50 % efficiency): above every size tried"),
        }
    }
}

fn write_csv(a: &Args, path: &PathBuf, rows: &[Row], metg_rows: &[Row], metg: Option<u32>) -> Result<()> {
    let run = format!("{:?},{:?},{:?}", a.service, a.service_mode, a.arrival).to_lowercase();
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{CSV_HEADER}").with_context(|| format!("writing {}", path.display()))?;
    for r in rows.iter().chain(metg_rows) {
        writeln!(f, "{}", csv_line(r, &run, metg)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
