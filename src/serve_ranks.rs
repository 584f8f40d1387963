//! `mpirun -np N cnse-dp serve ...`: one server per MPI rank (built with
//! `--features mpi`). Rank r listens on PORT + r (each of `--listen`,
//! `--http-listen`, `--metrics-listen`; port 0 stays 0), owns the backends
//! named for it (`--llama-url R=URL`), and its scheduler is mirrored to the
//! other ranks: an idle rank steals half of a busy rank's queued requests,
//! runs them on its own backends and sends the tokens back
//! (docs/SCHEDULER.md, "Serving across ranks").

use std::net::SocketAddr;

/// This process's place in an `mpirun` job, from the launcher's
/// environment (read before MPI starts: the ports depend on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub rank: usize,
    pub ranks: usize,
}

pub fn place() -> Option<Place> {
    let get = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| std::env::var(n).ok())
            .and_then(|v| v.parse::<usize>().ok())
    };
    let ranks = get(&["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"])?;
    let rank = get(&["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"])?;
    (ranks > 1 && rank < ranks).then_some(Place { rank, ranks })
}

/// `addr` with its port moved up by `rank` (port 0 stays 0).
pub fn shifted(addr: SocketAddr, rank: usize) -> anyhow::Result<SocketAddr> {
    if addr.port() == 0 {
        return Ok(addr);
    }
    let port = u16::try_from(usize::from(addr.port()) + rank)
        .map_err(|_| anyhow::anyhow!("port {} + rank {rank} is past 65535", addr.port()))?;
    Ok(SocketAddr::new(addr.ip(), port))
}

/// The `--llama-url` entries that rank `rank` serves: `R=URL` entries of
/// its own rank and plain `URL` entries (every rank).
pub fn urls_for(urls: &[String], rank: usize) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for u in urls {
        match u.split_once('=') {
            Some((r, url)) if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) => {
                let r: usize = r.parse().map_err(|_| anyhow::anyhow!("--llama-url {u}: bad rank"))?;
                if r == rank {
                    out.push(url.to_string());
                }
            }
            _ => out.push(u.clone()),
        }
    }
    Ok(out)
}

#[cfg(feature = "mpi")]
pub use mirror::RankMirror;

#[cfg(feature = "mpi")]
mod mirror {
    use std::sync::Arc;

    use anyhow::Context;
    use cnse_sched::mpi::{Mirror, MirrorConfig, MirrorStats, Parts};
    use cnse_server::Server;

    /// The rank's MPI communication thread, bridging its scheduler to the
    /// other ranks' for as long as the server runs (one long epoch).
    pub struct RankMirror {
        mirror: Mirror,
        pub stats: Arc<MirrorStats>,
    }

    impl RankMirror {
        /// Starts MPI and waits for every rank (a barrier): after this,
        /// every rank's server is up.
        pub fn start(server: &Server, slots: usize, expect_rank: usize) -> anyhow::Result<Self> {
            let tasks = server.tasks();
            let stats = Arc::new(MirrorStats::default());
            let parts = Parts {
                sched: tasks.sched.clone(),
                local: tasks.router.local.clone(),
                remote: tasks.router.remote.clone(),
                busy: tasks.busy.clone(),
                stats: stats.clone(),
            };
            let config = MirrorConfig {
                slots,
                // One request waiting for a slot while another rank has
                // one free is worth moving (bench-scaling waits for 2).
                steal_min_queued: 1,
                ..Default::default()
            };
            let mirror = Mirror::start(parts, config).context("starting MPI")?;
            anyhow::ensure!(
                mirror.rank == expect_rank,
                "MPI says rank {}, the launcher's environment said {expect_rank}",
                mirror.rank
            );
            mirror.begin(true).context("joining the other ranks")?;
            Ok(Self { mirror, stats })
        }

        pub fn rank(&self) -> usize {
            self.mirror.rank
        }

        /// Ends the communication thread (MPI_Finalize), after the server
        /// has drained.
        pub fn shutdown(self) {
            self.mirror.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_move_by_rank_and_urls_follow_their_rank() {
        let a: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        assert_eq!(shifted(a, 3).unwrap().port(), 7073);
        let z: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(shifted(z, 3).unwrap().port(), 0);
        assert!(shifted("127.0.0.1:65535".parse().unwrap(), 1).is_err());
        let urls: Vec<String> = ["0=http://a:1", "1=http://b:1", "http://c:1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(urls_for(&urls, 0).unwrap(), vec!["http://a:1", "http://c:1"]);
        assert_eq!(urls_for(&urls, 1).unwrap(), vec!["http://b:1", "http://c:1"]);
        assert_eq!(urls_for(&urls, 2).unwrap(), vec!["http://c:1"]);
    }
}
