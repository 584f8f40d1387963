//! When a client thread starts requests: the closed loop's ramp over the
//! warm-up, or the open loop's evenly spaced schedule (threads
//! interleaved), and when the loop must wake next for either.

use super::conn::{queue_send, Conn};
use super::streams::{issue, Ctx};

pub(super) enum Schedule {
    /// Every slot starts once, spread evenly over the warm-up so that
    /// streams do not run in lockstep waves; completions re-issue from then
    /// on. Slot number `i` of this thread starts at `ramp_at(i)`.
    Closed { warmup_ns: u64, slots_n: u64, started: u64 },
    /// Request `i` of this thread is intended at `offset + i * interval`.
    Open {
        interval_ns: f64,
        offset_ns: f64,
        next_index: u64,
    },
}

impl Schedule {
    /// Thread `t`'s share of a run of `threads` threads at `rate_per_s`
    /// (`None`: closed loop over `slots_n` slots).
    pub(super) fn new(rate_per_s: Option<f64>, t: usize, threads: usize, slots_n: u64, warmup_ns: u64) -> Schedule {
        match rate_per_s {
            None => Schedule::Closed {
                warmup_ns,
                slots_n,
                started: 0,
            },
            Some(r) => {
                let interval_ns = (1e9 * threads as f64 / r).max(1.0);
                Schedule::Open {
                    interval_ns,
                    offset_ns: interval_ns * t as f64 / threads as f64,
                    next_index: 0,
                }
            }
        }
    }

    pub(super) fn closed_loop(&self) -> bool {
        matches!(self, Schedule::Closed { .. })
    }

    /// When the next start is due.
    pub(super) fn next_due_ns(&self) -> u64 {
        match *self {
            Schedule::Closed {
                warmup_ns,
                slots_n,
                started,
            } => warmup_ns * started / slots_n,
            Schedule::Open {
                interval_ns,
                offset_ns,
                next_index,
            } => (offset_ns + interval_ns * next_index as f64) as u64,
        }
    }

    /// Starts every request due by `now` on the connections in `ctx.ready`
    /// (due requests of one wake-up go to the same connection while it has
    /// free slots, so they leave in one send).
    pub(super) fn start_due(&mut self, now: u64, conns: &mut [Conn], dirty: &mut Vec<u32>, ctx: &mut Ctx) {
        let closed = self.closed_loop();
        loop {
            let due = self.next_due_ns();
            if due > now || (!closed && due >= ctx.phase.end_ns) {
                return;
            }
            let Some(&c) = ctx.ready.front() else { return };
            let conn = &mut conns[c as usize];
            let slot = conn.st.free.pop();
            if conn.st.free.is_empty() || !conn.st.alive {
                ctx.ready.pop_front();
                conn.st.ready = false;
            }
            match slot.filter(|_| conn.st.alive) {
                Some(s) => {
                    // Closed loop: latency from the send; open loop: from
                    // the intended time.
                    let intended = if closed { now } else { due };
                    if !issue(&mut conn.st, s as usize, intended, now, ctx) {
                        return;
                    }
                    queue_send(conn, c, dirty);
                    self.advance();
                }
                // The closed loop's ramp counts a dead slot as started.
                None if closed => self.advance(),
                None => {}
            }
        }
    }

    fn advance(&mut self) {
        match self {
            Schedule::Closed { started, .. } => *started += 1,
            Schedule::Open { next_index, .. } => *next_index += 1,
        }
    }

    /// Open loop: requests intended before `end_ns` that found no free slot.
    pub(super) fn unsent(&self, end_ns: u64) -> u64 {
        match *self {
            Schedule::Closed { .. } => 0,
            Schedule::Open {
                interval_ns,
                offset_ns,
                next_index,
            } => {
                let due = ((end_ns as f64 - offset_ns) / interval_ns).ceil().max(0.0) as u64;
                due.saturating_sub(next_index)
            }
        }
    }

    /// Open loop: the intended times of the requests counted by
    /// [`Schedule::unsent`], oldest first (none for a closed loop).
    pub(super) fn unsent_intended(&self, end_ns: u64) -> impl Iterator<Item = u64> {
        let (interval_ns, offset_ns, next_index) = match *self {
            Schedule::Closed { .. } => (1.0, 0.0, 0),
            Schedule::Open {
                interval_ns,
                offset_ns,
                next_index,
            } => (interval_ns, offset_ns, next_index),
        };
        let n = self.unsent(end_ns);
        (next_index..next_index + n).map(move |i| (offset_ns + interval_ns * i as f64) as u64)
    }

    /// When the loop must wake for the next start, while connections have
    /// free slots: not sooner than a tick from now, so requests due
    /// meanwhile leave together (their latency still counts from their
    /// intended times).
    pub(super) fn wake_ns(&self, now: u64, tick_ns: u64) -> u64 {
        self.next_due_ns().max(now + tick_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closed_loop_ramps_its_slots_evenly_over_the_warm_up() {
        let mut s = Schedule::new(None, 0, 1, 4, 1_000);
        let mut due = Vec::new();
        for _ in 0..4 {
            due.push(s.next_due_ns());
            s.advance();
        }
        assert_eq!(due, [0, 250, 500, 750]);
        assert_eq!(s.unsent(10_000), 0, "a closed loop never leaves requests unsent");
    }

    #[test]
    fn the_open_loop_interleaves_threads_and_counts_what_it_could_not_send() {
        // 1000/s over 2 threads: each thread every 2 ms, thread 1 offset 1 ms.
        let t0 = Schedule::new(Some(1000.0), 0, 2, 0, 0);
        let mut t1 = Schedule::new(Some(1000.0), 1, 2, 0, 0);
        assert_eq!((t0.next_due_ns(), t1.next_due_ns()), (0, 1_000_000));
        t1.advance();
        assert_eq!(t1.next_due_ns(), 3_000_000);
        // Due before 10 ms: 1, 3, 5, 7, 9 ms; one was sent.
        assert_eq!(t1.unsent(10_000_000), 4);
        let backlog: Vec<u64> = t1.unsent_intended(10_000_000).collect();
        assert_eq!(backlog, [3_000_000, 5_000_000, 7_000_000, 9_000_000]);
        assert_eq!(t0.unsent_intended(0).count(), 0);
        let closed = Schedule::new(None, 0, 1, 4, 1_000);
        assert_eq!(closed.unsent_intended(10_000).count(), 0);
        // Not sooner than a tick from now.
        assert_eq!(t1.wake_ns(2_950_000, 100_000), 3_050_000);
    }
}
