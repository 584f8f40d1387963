//! Timeouts and shutdown: the sweep (handshake, HTTP request and idle
//! timeouts, stalled streams, draining connections) and the shutdown steps
//! (queued work answered 503 at once, running streams given the grace
//! period, then every connection drained and closed).

use cnse_proto::code;

use super::{Session, DRAIN_TIMEOUT};
use crate::conn::ConnState;
use crate::stream::Phase;
use crate::transport::Transport;

impl<T: Transport> Session<T> {
    /// Timeouts: handshake, idle, draining.
    pub(super) fn sweep(&mut self) {
        let now = self.tables.now;
        let (handshake, idle) = (self.cfg().handshake_timeout, self.cfg().idle_timeout);
        let mut i = 0;
        while i < self.tables.conn_live.len() {
            let slot = self.tables.conn_live[i];
            let c = &self.tables.conns[slot as usize];
            match c.state {
                ConnState::Handshake if now.duration_since(c.accepted) >= handshake => {
                    self.violate(slot, code::BAD_REQUEST, "no HELLO within the handshake timeout");
                }
                ConnState::Open
                    if c.proto == crate::conn::Proto::Http
                        && c.http.active == 0
                        && c.http.started.is_some_and(|t| now.duration_since(t) >= handshake) =>
                {
                    // A request that does not complete in time (slow head or body).
                    self.http_timeout(slot);
                }
                ConnState::Open if c.streams.is_empty() && now.duration_since(c.last_input) >= idle => {
                    self.close_conn(slot)
                }
                ConnState::Open => self.end_stalled(slot),
                ConnState::Draining { deadline } if now >= deadline => self.close_conn(slot),
                _ => {}
            }
            // A released slot left the list: its place holds one not yet seen.
            if self.tables.conn_live.get(i) == Some(&slot) {
                i += 1;
            }
        }
        self.flush_dirty();
    }

    /// Ends with ERROR 504 every stream of `slot` whose queued tokens have
    /// waited past the stall timeout: a running one (freeing its backend
    /// work) and a finished one whose last tokens the client never took
    /// (its stream slot and buffer would otherwise be held for good).
    fn end_stalled(&mut self, slot: u32) {
        let (now_us, limit) = (
            self.tables.now_us,
            cnse_backend::micros(self.tables.cfg.stream_stall_timeout),
        );
        let mut k = 0;
        while k < self.tables.conns[slot as usize].streams.len() {
            let sslot = self.tables.conns[slot as usize].streams[k].1;
            k += 1;
            let s = &self.tables.streams[sslot as usize];
            let open = matches!(s.phase, Phase::Running | Phase::Finished(_));
            if open && s.queue.tokens() > 0 && now_us.saturating_sub(s.last_us) >= limit {
                self.stop_stream(sslot);
                self.tables.fail(
                    sslot,
                    code::BACKEND_TIMEOUT,
                    "stream stalled: its tokens could not be sent (no credit, or the client does not read)",
                );
            }
        }
    }

    /// Drives shutdown once `requested`; true when every connection is gone
    /// (or the hard limit passed) and the worker may exit.
    pub fn shutdown_step(&mut self, requested: bool) -> bool {
        if self.shutting_down.is_none() {
            if !requested {
                return false;
            }
            self.shutting_down = Some(self.tables.now + self.cfg().shutdown_grace);
            // Queued work will not start: tell its clients now (a task
            // another core took already runs to its end).
            for sslot in 0..self.tables.streams.len() as u32 {
                let s = &self.tables.streams[sslot as usize];
                if s.phase != Phase::Queued {
                    continue;
                }
                let removed = s.task.as_ref().map(|t| t.cancel()) == Some(cnse_sched::CancelOutcome::Removed);
                if removed {
                    self.tables.fail(sslot, code::SHUTTING_DOWN, "server shutting down");
                }
            }
            self.flush_dirty();
        }
        let deadline = self.shutting_down.expect("set above");
        let now = self.tables.now;
        if self.tables.n.streams_open == 0 || now >= deadline {
            let mut i = 0;
            while i < self.tables.conn_live.len() {
                let slot = self.tables.conn_live[i];
                i += 1;
                if !matches!(
                    self.tables.conns[slot as usize].state,
                    ConnState::Open | ConnState::Handshake
                ) {
                    continue;
                }
                while let Some(&(_, sslot)) = self.tables.conns[slot as usize]
                    .streams
                    .iter()
                    .find(|&&(_, s)| self.tables.streams[s as usize].phase != Phase::Failed)
                {
                    self.stop_stream(sslot);
                    self.tables.fail(sslot, code::SHUTTING_DOWN, "server shutting down");
                }
                self.flush_conn(slot);
                let c = &mut self.tables.conns[slot as usize];
                c.state = ConnState::Draining {
                    deadline: now + DRAIN_TIMEOUT,
                };
                self.tables.mark_dirty(slot);
            }
            self.flush_dirty();
        }
        if self.tables.n.conns_open == 0 && self.tables.foreign.live == 0 {
            return true;
        }
        // Hard stop: nothing may keep the process from exiting.
        now >= deadline + DRAIN_TIMEOUT * 2
    }

    /// Closes every descriptor the session still holds (the I/O layer has
    /// drained its ops first).
    pub fn close_all(&mut self) {
        for c in &mut self.tables.conns {
            if c.fd >= 0 {
                self.io.close(c.fd);
                c.fd = -1;
            }
        }
    }
}
