//! What a rank knows of the others: their last load, whether they finished
//! the epoch, when they were last heard from. Pure (a clock is passed in),
//! so the victim choice and the dead-rank rule are tested without MPI.

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub queued: u32,
    pub free_slots: u32,
    pub done: bool,
    pub reported: bool,
    pub dead: bool,
    pub heard_at: Instant,
}

#[derive(Debug)]
pub struct Peers {
    me: usize,
    peers: Vec<Peer>,
    rng: u64,
}

impl Peers {
    pub fn new(me: usize, ranks: usize, now: Instant) -> Self {
        let p = Peer {
            queued: 0,
            free_slots: 0,
            done: false,
            reported: false,
            dead: false,
            heard_at: now,
        };
        Self {
            me,
            peers: vec![p; ranks],
            rng: 0x2545_f491_4f6c_dd1d ^ ((me as u64 + 1) << 17),
        }
    }

    /// A new epoch: everyone alive starts over (the dead stay dead).
    pub fn reset(&mut self, now: Instant) {
        for p in self.peers.iter_mut() {
            p.queued = 0;
            p.free_slots = 0;
            p.done = false;
            p.reported = false;
            p.heard_at = now;
        }
    }

    pub fn heard(&mut self, rank: usize, now: Instant) {
        self.peers[rank].heard_at = now;
    }

    pub fn load(&mut self, rank: usize, queued: u32, free_slots: u32, done: bool, now: Instant) {
        let p = &mut self.peers[rank];
        p.queued = queued;
        p.free_slots = free_slots;
        p.done = p.done || done;
        p.heard_at = now;
    }

    pub fn get(&self, rank: usize) -> &Peer {
        &self.peers[rank]
    }

    pub fn get_mut(&mut self, rank: usize) -> &mut Peer {
        &mut self.peers[rank]
    }

    /// Peers that were still expected to speak (not done and reported)
    /// and have been silent longer than `dead_after`: marked dead and
    /// returned, once each.
    pub fn newly_dead(&mut self, now: Instant, dead_after: Duration) -> Vec<usize> {
        let mut out = Vec::new();
        for (r, p) in self.peers.iter_mut().enumerate() {
            let waiting = !(p.done && p.reported);
            if r != self.me && !p.dead && waiting && now.duration_since(p.heard_at) > dead_after {
                p.dead = true;
                out.push(r);
            }
        }
        out
    }

    /// Others that are alive.
    pub fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.peers.len()).filter(move |&r| r != self.me && !self.peers[r].dead)
    }

    /// A random live peer with at least `min_queued` queued tasks.
    pub fn victim(&mut self, min_queued: u32) -> Option<usize> {
        let n = self.peers.len();
        let start = (self.next_random() % n as u64) as usize;
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&r| r != self.me && !self.peers[r].dead && self.peers[r].queued >= min_queued)
    }

    /// Every live peer has finished its own tasks this epoch.
    pub fn all_done(&self) -> bool {
        self.live().all(|r| self.peers[r].done)
    }

    pub fn all_reported(&self) -> bool {
        self.live().all(|r| self.peers[r].reported)
    }

    fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn victims_are_busy_live_others_and_vary() {
        let t = Instant::now();
        let mut p = Peers::new(0, 4, t);
        assert_eq!(p.victim(2), None);
        p.load(0, 100, 0, false, t); // myself: never a victim
        p.load(2, 10, 0, false, t);
        p.load(3, 10, 0, false, t);
        let mut seen = [0; 4];
        for _ in 0..100 {
            seen[p.victim(2).unwrap()] += 1;
        }
        assert_eq!((seen[0], seen[1]), (0, 0));
        assert!(seen[2] > 10 && seen[3] > 10, "randomised: {seen:?}");
    }

    #[test]
    fn a_silent_peer_is_dead_once_and_never_a_victim() {
        let t = Instant::now();
        let mut p = Peers::new(0, 3, t);
        p.load(1, 50, 0, false, t);
        let later = t + Duration::from_millis(500);
        p.heard(2, later);
        assert_eq!(p.newly_dead(later, Duration::from_millis(100)), vec![1]);
        assert!(p.newly_dead(later, Duration::from_millis(100)).is_empty());
        assert_eq!(p.victim(1), None);
        assert!(!p.all_done());
        p.load(2, 0, 1, true, later);
        assert!(p.all_done(), "the dead are not waited for");
    }

    #[test]
    fn a_done_and_reported_peer_may_go_quiet() {
        let t = Instant::now();
        let mut p = Peers::new(0, 2, t);
        p.load(1, 0, 1, true, t);
        p.get_mut(1).reported = true;
        assert!(p
            .newly_dead(t + Duration::from_secs(60), Duration::from_millis(1))
            .is_empty());
    }
}
