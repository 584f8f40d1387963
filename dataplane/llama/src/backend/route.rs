//! Routing and health: which llama-server a stream goes to, the in-flight
//! places reserved on it (shared by all cores), and the health checks that
//! take a server out of rotation and bring it back.

use std::sync::atomic::Ordering;

use cnse_backend::{Io, Reject};

use super::{Conn, LlamaBackend, Task};
use crate::http;

impl LlamaBackend {
    /// Picks a server by the configured policy (the session's pin, see
    /// `sticky`, then prefix affinity, see `affinity`, then the healthy
    /// server with the fewest requests in flight), reserves a place on it
    /// and, with a cache-aware policy, one of its llama-server slots (a
    /// session key is pinned where the stream is sent: `launch`). `Err` is
    /// the reject for the stream.
    pub(super) fn route(&mut self) -> Result<(usize, Option<u16>), Reject> {
        if let Some((u, hint)) = self.session_choice() {
            if self.reserve(u) {
                self.llama.session_routed += 1;
                return Ok((u, self.take_slot(u, hint)));
            }
        }
        if let Some((u, hint)) = self.prefix_choice() {
            if self.reserve(u) {
                self.llama.prefix_routed += 1;
                return Ok((u, self.take_slot(u, hint)));
            }
        }
        let u = self.least_outstanding()?;
        Ok((u, self.take_slot(u, self.slot_hint(u))))
    }

    pub(super) fn reserve(&self, u: usize) -> bool {
        let limit = self.cfg.inflight_per_backend;
        self.shared[u]
            .inflight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| (v < limit).then_some(v + 1))
            .is_ok()
    }

    /// The healthy server with the fewest requests in flight, reserved.
    fn least_outstanding(&mut self) -> Result<usize, Reject> {
        let n = self.shared.len();
        let limit = self.cfg.inflight_per_backend;
        let mut any_healthy = false;
        // A few rounds: another core may take the last place between the
        // look and the reservation.
        for _ in 0..4 {
            let mut best: Option<(usize, usize)> = None;
            for k in 0..n {
                let u = (self.round_robin + k) % n;
                let s = &self.shared[u];
                if !s.healthy.load(Ordering::Acquire) {
                    continue;
                }
                any_healthy = true;
                let inflight = s.inflight.load(Ordering::Acquire);
                if inflight < limit && best.is_none_or(|(_, b)| inflight < b) {
                    best = Some((u, inflight));
                }
            }
            let Some((u, _)) = best else { break };
            if self.reserve(u) {
                self.round_robin = (u + 1) % n;
                return Ok(u);
            }
        }
        if any_healthy {
            Err(Reject::new(
                429,
                "all llama-server backends are at their in-flight limit",
            ))
        } else {
            Err(Reject::new(
                502,
                format!("no healthy llama-server backend ({n} configured)"),
            ))
        }
    }

    pub(super) fn release(&mut self, i: usize) {
        self.free_slot(i);
        let slot = &mut self.slots[i];
        if slot.reserved {
            slot.reserved = false;
            let prev = self.shared[slot.upstream].inflight.fetch_sub(1, Ordering::AcqRel);
            assert!(prev > 0, "in-flight count underflow");
        }
    }

    /// Releases the slot's place once it holds no work and its connection
    /// is idle or gone.
    pub(super) fn settle(&mut self, i: usize) {
        let slot = &self.slots[i];
        if matches!(slot.task, Task::None) && matches!(slot.conn, Conn::Closed | Conn::Ready(_)) {
            self.release(i);
        }
    }

    pub(super) fn url(&self, i: usize) -> &str {
        &self.shared[self.slots[i].upstream].target.url
    }

    pub(super) fn mark_down(&mut self, upstream: usize) {
        if self.shared[upstream].healthy.swap(false, Ordering::AcqRel) {
            self.llama.evicted += 1;
            tracing::warn!(server = %self.shared[upstream].target.url, "llama-server evicted from rotation (failed or unreachable); health checks follow");
        }
    }

    pub(super) fn mark_up(&mut self, upstream: usize) {
        if !self.shared[upstream].healthy.swap(true, Ordering::AcqRel) {
            self.llama.readmitted += 1;
            self.upkeep.spares_dirty = true;
            tracing::info!(server = %self.shared[upstream].target.url, "llama-server healthy again, back in rotation");
        }
    }

    pub(super) fn start_health(&mut self, u: usize, io: &mut dyn Io) {
        let i = self.stream_slots + u;
        let slot = &mut self.slots[i];
        if !matches!(slot.task, Task::None) || slot.conn != Conn::Closed {
            return;
        }
        self.llama.health_checks += 1;
        slot.task = Task::Health;
        slot.send.clear();
        slot.send
            .extend_from_slice(&http::health_request(&self.shared[u].target.authority));
        match self.open_connect(i, io) {
            Ok(()) => self.slots[i].deadline = Some(io.now() + self.cfg.health_timeout),
            Err(_) => {
                self.slots[i].task = Task::None;
                self.mark_down(u);
            }
        }
    }

    /// Whether a new stream could be routed now (see `Backend::has_capacity`).
    pub(super) fn can_route(&self) -> bool {
        let limit = self.cfg.inflight_per_backend;
        let mut any_healthy = false;
        for s in self.shared.iter() {
            if s.healthy.load(Ordering::Acquire) {
                any_healthy = true;
                if s.inflight.load(Ordering::Acquire) < limit {
                    return true;
                }
            }
        }
        // With every server down, `start` answers 502 at once rather than
        // letting requests wait in the admission queue for nothing.
        !any_healthy
    }
}
