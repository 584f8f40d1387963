//! [`Backend::poll`](cnse_backend::Backend::poll)'s work, kept off the
//! per-token path: a loop turn that only moved tokens touches none of the
//! slot array. Paused streams that were resumed are looked for only after
//! a resume; the spares' upkeep runs after a connection closed here or a
//! server was readmitted, else every [`SPARES_REFRESH`] (other cores'
//! streams move each server's spare cap); the deadlines are scanned only
//! from `deadline_scan_at`, a lower bound of every slot's deadline.

use std::time::{Duration, Instant};

use cnse_backend::{Io, Sink};

use super::{Flow, LlamaBackend, Task};

/// How often the spares of every server are checked when nothing on this
/// core asked for it.
pub(super) const SPARES_REFRESH: Duration = Duration::from_millis(10);

/// What `poll` must look at again.
#[derive(Debug, Default)]
pub(super) struct Upkeep {
    /// A paused stream was resumed (its slot is `Flow::Woken`).
    pub woken: bool,
    /// A connection closed or a server came back: spares may be missing.
    pub spares_dirty: bool,
    pub spares_next: Option<Instant>,
    /// No slot's deadline lies before this (`None`: scan at the next poll).
    pub deadline_scan_at: Option<Instant>,
    /// The shortest timeout any deadline is set with: a deadline set at
    /// `t` is never before `t + timeout_min`.
    pub timeout_min: Duration,
}

impl Upkeep {
    pub(super) fn new(cfg: &crate::LlamaConfig) -> Self {
        let timeout_min = [
            cfg.connect_timeout,
            cfg.first_token_timeout,
            cfg.idle_token_timeout,
            cfg.health_timeout,
            cfg.keepalive_idle,
        ]
        .into_iter()
        .min()
        .unwrap_or_default();
        Self {
            timeout_min,
            ..Self::default()
        }
    }
}

impl LlamaBackend {
    pub(super) fn upkeep(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        let now = io.now();
        if std::mem::take(&mut self.upkeep.woken) {
            for i in 0..self.slots.len() {
                if let Task::Stream(w) = &mut self.slots[i].task {
                    if w.flow == Flow::Woken {
                        w.flow = Flow::Flowing;
                        self.process(i, io, sink);
                    }
                }
            }
        }
        if self.health_owner {
            for u in 0..self.shared.len() {
                let due = self.next_health[u].is_none_or(|t| t <= now);
                if due {
                    self.next_health[u] = Some(now + self.cfg.health_interval);
                    self.start_health(u, io);
                }
            }
        }
        let spares_due = self.upkeep.spares_next.is_none_or(|t| t <= now);
        if std::mem::take(&mut self.upkeep.spares_dirty) || spares_due {
            self.upkeep.spares_next = Some(now + SPARES_REFRESH);
            for u in 0..self.shared.len() {
                self.fill_spares(u, io);
            }
        }
        if self.upkeep.deadline_scan_at.is_none_or(|t| t <= now) {
            // Deadlines set from here on (by the timeouts handled below or
            // later) are at least `timeout_min` away.
            let mut earliest = now + self.upkeep.timeout_min;
            for i in 0..self.slots.len() {
                let Some(d) = self.slots[i].deadline else { continue };
                if d <= now {
                    self.on_timeout(i, io, sink);
                }
                if let Some(d) = self.slots[i].deadline {
                    earliest = earliest.min(d);
                }
            }
            self.upkeep.deadline_scan_at = Some(earliest);
        }
        let mut next = self.upkeep.deadline_scan_at;
        let min = |next: &mut Option<Instant>, t: Instant| *next = Some(next.map_or(t, |n| n.min(t)));
        if let Some(t) = self.spare_hold_until() {
            min(&mut next, t);
        }
        if self.health_owner {
            for t in self.next_health.iter().flatten() {
                min(&mut next, *t);
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_bound_is_the_shortest_timeout_a_deadline_is_set_with() {
        let mut cfg = crate::LlamaConfig {
            connect_timeout: Duration::from_secs(3),
            first_token_timeout: Duration::from_secs(60),
            idle_token_timeout: Duration::from_secs(30),
            health_timeout: Duration::from_millis(700),
            keepalive_idle: Duration::from_secs(4),
            ..Default::default()
        };
        assert_eq!(Upkeep::new(&cfg).timeout_min, Duration::from_millis(700));
        cfg.keepalive_idle = Duration::from_millis(250);
        let u = Upkeep::new(&cfg);
        assert_eq!(u.timeout_min, Duration::from_millis(250));
        // Nothing scanned yet: the first poll scans.
        assert!(u.deadline_scan_at.is_none() && u.spares_next.is_none());
    }
}
