//! The llama backend's own counters, and the [`BackendStats`] it reports.

use std::sync::atomic::Ordering;

use cnse_backend::{BackendStats, EVENTS};

use super::{Flow, LlamaBackend, Task};

/// Counters beyond [`BackendStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LlamaStats {
    /// Requests sent on a reused keep-alive connection.
    pub reused: u64,
    /// Requests re-sent on a fresh connection after a pooled one was found
    /// closed by the server.
    pub retried: u64,
    /// Times a llama-server was marked down (failure or health check).
    pub evicted: u64,
    /// Times a health check found a down llama-server healthy again.
    pub readmitted: u64,
    pub health_checks: u64,
    pub timeouts: u64,
    /// Streams sent to the server with the longest cached prefix (not
    /// the least-loaded one's choice).
    pub prefix_routed: u64,
    /// Streams with a session key sent to the server the key was pinned
    /// to (`--llama-route session`).
    pub session_routed: u64,
    /// Streams sent again to another server before their first token
    /// (connection refused, 5xx, 429), invisibly to the client.
    pub retried_elsewhere: u64,
    /// Connections opened ahead of requests (spares), for servers that
    /// close after each stream.
    pub spares_opened: u64,
    /// Streams whose server failed after tokens were delivered, continued
    /// on another server from their text so far (`failover`).
    pub failed_over: u64,
    /// Requests that found a spare (connected, or its CONNECT in flight).
    pub spares_taken: u64,
    /// Idle connections (spares or pooled) the server closed while they
    /// waited; each was replaced before a request could use it.
    pub idle_closed: u64,
}

impl LlamaStats {
    /// The counters in the order of [`EVENTS`].
    pub fn events(&self) -> [u64; EVENTS.len()] {
        [
            self.reused,
            self.retried,
            self.retried_elsewhere,
            self.prefix_routed,
            self.evicted,
            self.readmitted,
            self.health_checks,
            self.timeouts,
            self.spares_opened,
            self.spares_taken,
            self.idle_closed,
            self.failed_over,
            self.session_routed,
        ]
    }
}

impl LlamaBackend {
    /// This core's [`BackendStats`]: its own counts, the process-wide
    /// server and spare gauges, and [`LlamaStats::events`].
    pub(super) fn backend_stats(&self) -> BackendStats {
        let paused = self
            .slots
            .iter()
            .filter(|s| matches!(&s.task, Task::Stream(w) if w.flow == Flow::Paused))
            .count() as u64;
        let up = self.shared.iter().filter(|s| s.healthy.load(Ordering::Acquire)).count();
        let spares = self
            .shared
            .iter()
            .map(|s| s.spares.load(Ordering::Acquire))
            .sum::<usize>();
        BackendStats {
            active: self.by_id.len() as u64,
            paused,
            servers: self.shared.len() as u64,
            servers_up: up as u64,
            spares: spares as u64,
            events: self.llama.events(),
            ..self.stats
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_event_is_the_counter_of_its_name() {
        let s = LlamaStats {
            reused: 1,
            retried: 2,
            evicted: 3,
            readmitted: 4,
            health_checks: 5,
            timeouts: 6,
            prefix_routed: 7,
            session_routed: 8,
            retried_elsewhere: 9,
            spares_opened: 10,
            failed_over: 11,
            spares_taken: 12,
            idle_closed: 13,
        };
        let field = |name: &str| match name {
            "reused" => s.reused,
            "retried" => s.retried,
            "evicted" => s.evicted,
            "readmitted" => s.readmitted,
            "health_checks" => s.health_checks,
            "timeouts" => s.timeouts,
            "prefix_routed" => s.prefix_routed,
            "session_routed" => s.session_routed,
            "retried_elsewhere" => s.retried_elsewhere,
            "spares_opened" => s.spares_opened,
            "failed_over" => s.failed_over,
            "spares_taken" => s.spares_taken,
            "idle_closed" => s.idle_closed,
            _ => panic!("no counter for the event {name:?}"),
        };
        for ((name, _), n) in EVENTS.iter().zip(s.events()) {
            assert_eq!(n, field(name), "{name}");
        }
    }
}
