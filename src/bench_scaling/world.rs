//! One process or one MPI rank: the same calls either way, so
//! `bench-scaling` runs alone (`cnse-dp bench-scaling ...`) or under
//! `mpirun` (built with `--features mpi`).

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use anyhow::Result;
use cnse_sched::{Config, Core, Inbox, Inboxes, Job, Router, Scheduler, Wake};

use super::task::{Done, Synthetic};

/// The owner of every core's results in this bench is the main thread: a
/// result for it unparks it (the server's wake writes an eventfd instead).
pub struct Unpark(pub std::thread::Thread);

impl Wake for Unpark {
    fn wake(&self, _core: usize) {
        self.0.unpark();
    }
}

/// Mirror settings from the command line.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub struct Tuning {
    pub dead_after_ms: u64,
    pub freeze_rank: Option<usize>,
    pub freeze_ms: u64,
}

pub type SchedCore = Core<Job<Synthetic>>;

/// Bound of each owner inbox and of the communication thread's outbox.
pub const INBOX_MAX: usize = 4096;

pub struct Shared {
    pub sched: Scheduler<Job<Synthetic>>,
    pub router: Router<Done, Unpark>,
    pub busy: Arc<AtomicUsize>,
    #[cfg(feature = "mpi")]
    pub stats: Arc<cnse_sched::mpi::MirrorStats>,
}

pub enum World {
    Solo,
    #[cfg(feature = "mpi")]
    Mpi(cnse_sched::mpi::Mirror),
}

/// Counters of the mirror at one moment (zero when alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct MirrorCounts {
    pub stolen_in: u64,
    pub stolen_out: u64,
    pub steal_requests: u64,
    pub cancels_sent: u64,
    pub cancels_received: u64,
}

impl World {
    /// The scheduler, its cores and (with `mpi` and `use_mpi`) the mirror.
    pub fn start(
        cores: usize,
        queued_max: usize,
        use_mpi: bool,
        tuning: Tuning,
    ) -> Result<(World, Shared, Vec<SchedCore>)> {
        let (sched, cores_v) = Scheduler::new(&Config {
            cores,
            queued_max,
            fifo: false,
        })?;
        let local = Arc::new(Inboxes::new(cores, INBOX_MAX, Unpark(std::thread::current())));
        let remote = Arc::new(Inbox::new(INBOX_MAX));
        let busy = Arc::new(AtomicUsize::new(0));
        #[cfg(feature = "mpi")]
        {
            let stats = Arc::new(cnse_sched::mpi::MirrorStats::default());
            if use_mpi {
                let parts = cnse_sched::mpi::Parts {
                    sched: sched.clone(),
                    local: local.clone(),
                    remote: remote.clone(),
                    busy: busy.clone(),
                    stats: stats.clone(),
                };
                let ms = std::time::Duration::from_millis;
                let config = cnse_sched::mpi::MirrorConfig {
                    slots: cores,
                    dead_after: ms(tuning.dead_after_ms),
                    test_freeze: tuning.freeze_rank.map(|r| (r, ms(tuning.freeze_ms))),
                    ..Default::default()
                };
                let mirror = cnse_sched::mpi::Mirror::start(parts, config)?;
                let router = Router {
                    rank: mirror.rank as u32,
                    local,
                    remote,
                };
                let shared = Shared {
                    sched,
                    router,
                    busy,
                    stats,
                };
                return Ok((World::Mpi(mirror), shared, cores_v));
            }
            let router = Router { rank: 0, local, remote };
            Ok((
                World::Solo,
                Shared {
                    sched,
                    router,
                    busy,
                    stats,
                },
                cores_v,
            ))
        }
        #[cfg(not(feature = "mpi"))]
        {
            let _ = tuning;
            anyhow::ensure!(
                !use_mpi,
                "this cnse-dp was built without MPI: build with --features mpi"
            );
            let router = Router { rank: 0, local, remote };
            Ok((World::Solo, Shared { sched, router, busy }, cores_v))
        }
    }

    pub fn rank(&self) -> usize {
        match self {
            World::Solo => 0,
            #[cfg(feature = "mpi")]
            World::Mpi(m) => m.rank,
        }
    }

    pub fn ranks(&self) -> usize {
        match self {
            World::Solo => 1,
            #[cfg(feature = "mpi")]
            World::Mpi(m) => m.ranks,
        }
    }

    pub fn begin(&self, _steal: bool) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let World::Mpi(m) = self {
            m.begin(_steal)?;
        }
        Ok(())
    }

    /// This rank's tasks are all answered; returns once none is left anywhere.
    pub fn finish_origin(&self) -> Result<()> {
        #[cfg(feature = "mpi")]
        if let World::Mpi(m) = self {
            m.origin_done()?;
            m.wait_quiet()?;
        }
        Ok(())
    }

    /// Rank 0 gets every rank's report (None for a rank given up).
    pub fn end(&self, report: Vec<u8>) -> Result<Vec<Option<Vec<u8>>>> {
        match self {
            World::Solo => Ok(vec![Some(report)]),
            #[cfg(feature = "mpi")]
            World::Mpi(m) => Ok(m.end(report)?.reports),
        }
    }

    pub fn shutdown(self) {
        #[cfg(feature = "mpi")]
        if let World::Mpi(m) = self {
            m.shutdown();
        }
    }
}

impl Shared {
    pub fn mirror_counts(&self) -> MirrorCounts {
        #[cfg(feature = "mpi")]
        {
            use std::sync::atomic::Ordering::Relaxed;
            let s = &self.stats;
            MirrorCounts {
                stolen_in: s.stolen_in.load(Relaxed),
                stolen_out: s.stolen_out.load(Relaxed),
                steal_requests: s.steal_requests.load(Relaxed),
                cancels_sent: s.cancels_sent.load(Relaxed),
                cancels_received: s.cancels_received.load(Relaxed),
            }
        }
        #[cfg(not(feature = "mpi"))]
        MirrorCounts::default()
    }
}
