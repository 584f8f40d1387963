//! A backend that misbehaves on purpose: the synthetic backend underneath,
//! and per request (decided from the seed) a refusal at start, a stall
//! (holds the work, never produces) or a failure after its first token.

use std::collections::BTreeMap;
use std::time::Instant;

use cnse_backend::{Backend, BackendStats, Delivery, FinishReason, Io, Job, Reject, Sink, WorkId};
use cnse_proto::code;

use super::rng::Rng;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fate {
    Stall,
    Fail,
}

pub struct FlakyBackend {
    inner: Box<dyn Backend>,
    rng: Rng,
    fates: BTreeMap<WorkId, Fate>,
    /// Percent of requests refused, stalled and failed.
    refuse_pct: u64,
    stall_pct: u64,
    fail_pct: u64,
}

impl FlakyBackend {
    pub fn new(inner: Box<dyn Backend>, seed: u64, flaky: bool) -> FlakyBackend {
        let (refuse_pct, stall_pct, fail_pct) = if flaky { (5, 5, 5) } else { (0, 0, 0) };
        FlakyBackend {
            inner,
            rng: Rng::new(seed ^ 0xbac0),
            fates: BTreeMap::new(),
            refuse_pct,
            stall_pct,
            fail_pct,
        }
    }
}

/// Passes tokens through, except that a request fated to fail gets ERROR
/// 502 at its first token.
struct FailingSink<'a> {
    inner: &'a mut dyn Sink,
    fates: &'a mut BTreeMap<WorkId, Fate>,
}

impl FailingSink<'_> {
    /// Fails the request at its first token if that is its fate.
    fn fails(&mut self, id: WorkId) -> bool {
        if self.fates.get(&id) != Some(&Fate::Fail) {
            return false;
        }
        self.fates.remove(&id);
        self.inner.error(id, code::BACKEND_FAILED, "simulated backend failure");
        true
    }
}

impl Sink for FailingSink<'_> {
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        if self.fails(id) {
            return Delivery::Gone;
        }
        self.inner.token(id, text)
    }

    fn tokens(&mut self, id: WorkId, text: &[u8], lens: &[u32]) -> (usize, Delivery) {
        if self.fails(id) {
            return (0, Delivery::Gone);
        }
        self.inner.tokens(id, text, lens)
    }

    fn end(&mut self, id: WorkId, reason: FinishReason) {
        self.fates.remove(&id);
        self.inner.end(id, reason);
    }

    fn error(&mut self, id: WorkId, code: u32, message: &str) {
        self.fates.remove(&id);
        self.inner.error(id, code, message);
    }
}

impl Backend for FlakyBackend {
    fn name(&self) -> &str {
        "flaky-synthetic"
    }

    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject> {
        let roll = self.rng.below(100);
        if roll < self.refuse_pct {
            return Err(Reject::new(code::SHUTTING_DOWN, "simulated backend refusal"));
        }
        if roll < self.refuse_pct + self.stall_pct {
            // Held, never produced: only a cancel, a disconnect or shutdown
            // ends it.
            self.fates.insert(job.id, Fate::Stall);
            return Ok(());
        }
        self.inner.start(job, io)?;
        if roll < self.refuse_pct + self.stall_pct + self.fail_pct {
            self.fates.insert(job.id, Fate::Fail);
        }
        Ok(())
    }

    fn cancel(&mut self, id: WorkId, io: &mut dyn Io) {
        if self.fates.remove(&id) != Some(Fate::Stall) {
            self.inner.cancel(id, io);
        }
    }

    fn pause(&mut self, id: WorkId) {
        self.inner.pause(id);
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        if self.fates.get(&id) != Some(&Fate::Stall) {
            self.inner.resume(id, io);
        }
    }

    fn complete(&mut self, tag: u64, result: i32, flags: u32, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.inner.complete(tag, result, flags, io, sink);
    }

    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        let mut sink = FailingSink {
            inner: sink,
            fates: &mut self.fates,
        };
        self.inner.poll(io, &mut sink)
    }

    fn stats(&self) -> BackendStats {
        let stalled = self.fates.values().filter(|&&f| f == Fate::Stall).count() as u64;
        let mut s = self.inner.stats();
        s.active += stalled;
        s
    }
}
