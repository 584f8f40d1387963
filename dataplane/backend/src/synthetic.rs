//! The embedded synthetic backend: deterministic text from (prompt, seed),
//! produced at a configured speed (time to first token, then one token per
//! interval), or as fast as the data plane takes it (zero delay). It behaves
//! like a model of a given speed, so the data plane can be measured without
//! a model.
//!
//! Token choice is delegated to a [`Picker`]: the default hashes (prompt,
//! seed, position) on the CPU; the GPU picker (`--synthetic-device cuda`)
//! samples each token from generated logits with the kernels of
//! `cnse-kernels`, batched across all streams due in one loop turn.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_proto::code;

use crate::{Backend, BackendFactory, BackendStats, Delivery, FinishReason, Io, Job, Reject, Sink, WorkId};

mod text;

pub use text::{
    expected_text, prompt_hash, splitmix64, token_count, HashPicker, PickRow, Picker, PickerFactory, Vocab,
};

/// Tokens produced for one stream in one poll at most, so a zero-delay
/// stream of 65,536 tokens does not starve the others of a turn.
const TOKENS_PER_POLL_MAX: u32 = 256;

struct HashPickerFactory;

impl PickerFactory for HashPickerFactory {
    fn build(&self, _core: usize) -> Result<Box<dyn Picker>, String> {
        Ok(Box::new(HashPicker))
    }
}

#[derive(Clone)]
pub struct SyntheticConfig {
    /// Delay from start to the first token.
    pub ttft: Duration,
    /// Delay between tokens after the first.
    pub token_interval: Duration,
    /// Work held at once per core; beyond it requests wait in the server's
    /// admission queue.
    pub active_max: usize,
    pub picker: Arc<dyn PickerFactory>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            ttft: Duration::from_millis(20),
            token_interval: Duration::from_millis(5),
            active_max: 65_536,
            picker: Arc::new(HashPickerFactory),
        }
    }
}

impl std::fmt::Debug for SyntheticConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticConfig")
            .field("ttft", &self.ttft)
            .field("token_interval", &self.token_interval)
            .field("active_max", &self.active_max)
            .finish()
    }
}

pub struct SyntheticFactory {
    cfg: SyntheticConfig,
    vocab: Arc<Vocab>,
    /// (slots of the process, worker cores) when set: `active_max` per
    /// core is that core's share.
    process_slots: Option<(usize, usize)>,
}

impl SyntheticFactory {
    pub fn new(cfg: SyntheticConfig) -> Self {
        Self {
            cfg,
            vocab: Vocab::shared_arc().clone(),
            process_slots: None,
        }
    }

    /// `total` sequences at once for the whole process (like a GPU's batch
    /// slots), split over `cores` per-core backends: core i holds
    /// `total / cores`, one more for the first `total % cores`. Work beyond
    /// a core's share waits in the scheduler, where idle cores steal it.
    pub fn with_process_slots(mut self, total: usize, cores: usize) -> Self {
        self.process_slots = Some((total, cores.max(1)));
        self
    }

    /// The sequences core `core` holds at once.
    pub fn slots_of(&self, core: usize) -> usize {
        match self.process_slots {
            Some((total, cores)) => total / cores + usize::from(core < total % cores),
            None => self.cfg.active_max,
        }
    }
}

impl BackendFactory for SyntheticFactory {
    fn build(&self, core: usize) -> Result<Box<dyn Backend>, String> {
        let picker = self.cfg.picker.build(core)?;
        let cfg = SyntheticConfig {
            active_max: self.slots_of(core),
            ..self.cfg.clone()
        };
        Ok(Box::new(Synthetic::new(cfg, self.vocab.clone(), picker)))
    }
}

struct Work {
    id: WorkId,
    seed: u64,
    max_tokens: u32,
    produced: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    next_due: Instant,
    paused: bool,
    /// Bumped whenever the work is rescheduled, so stale heap entries are
    /// recognised.
    sched: u32,
}

/// Hashes a [`WorkId`] (a slot and a generation the loop packs into a
/// u64) with one multiply: the index sees no untrusted keys, and SipHash
/// was a tenth of the backend's time at 4,096 streams.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0 ^ x).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0 ^ (self.0 >> 32)
    }
}

pub struct Synthetic {
    cfg: SyntheticConfig,
    vocab: Arc<Vocab>,
    picker: Box<dyn Picker>,
    works: Vec<Work>,
    index: HashMap<WorkId, u32, BuildHasherDefault<IdHasher>>,
    free: Vec<u32>,
    /// Schedule entries `(due, slot, sched)`. Most arrive in due order (a
    /// fixed TTFT after the turn's `now`; `now` itself with a zero token
    /// interval) and go to `fifo`, O(1) each; the rest (paced tokens that
    /// catch up, resumes) to `heap`. The next due entry is the earlier
    /// head of the two.
    fifo: VecDeque<(Instant, u32, u32)>,
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    rows: Vec<PickRow>,
    row_owner: Vec<(u32, u32)>,
    ids: Vec<u32>,
    stats: BackendStats,
}

impl Synthetic {
    pub fn new(cfg: SyntheticConfig, vocab: Arc<Vocab>, picker: Box<dyn Picker>) -> Self {
        let reserve = cfg.active_max.min(4096);
        Self {
            cfg,
            vocab,
            picker,
            works: Vec::with_capacity(reserve),
            index: HashMap::with_capacity_and_hasher(reserve, BuildHasherDefault::default()),
            free: Vec::with_capacity(reserve),
            fifo: VecDeque::with_capacity(reserve),
            heap: BinaryHeap::with_capacity(reserve),
            rows: Vec::new(),
            row_owner: Vec::new(),
            ids: Vec::new(),
            stats: BackendStats::default(),
        }
    }

    fn schedule(&mut self, slot: u32, due: Instant) {
        let w = &mut self.works[slot as usize];
        w.next_due = due;
        w.sched = w.sched.wrapping_add(1);
        let e = (due, slot, w.sched);
        if self.fifo.back().is_none_or(|b| b.0 <= due) {
            self.fifo.push_back(e);
        } else {
            self.heap.push(Reverse(e));
        }
    }

    /// The earliest schedule entry, and whether it is the FIFO's.
    fn next_entry(&self) -> Option<((Instant, u32, u32), bool)> {
        match (self.fifo.front(), self.heap.peek()) {
            (Some(&f), Some(&Reverse(h))) => Some(if f.0 <= h.0 { (f, true) } else { (h, false) }),
            (Some(&f), None) => Some((f, true)),
            (None, Some(&Reverse(h))) => Some((h, false)),
            (None, None) => None,
        }
    }

    fn remove(&mut self, slot: u32) {
        let w = &mut self.works[slot as usize];
        self.index.remove(&w.id);
        w.sched = w.sched.wrapping_add(1);
        if w.paused {
            self.stats.paused -= 1;
        }
        w.paused = false;
        self.free.push(slot);
        self.stats.active -= 1;
    }

    /// How many tokens work `slot` owes at `now`.
    fn due_tokens(&self, slot: u32, now: Instant) -> u32 {
        let w = &self.works[slot as usize];
        let left = w.max_tokens - w.produced;
        let n = if self.cfg.token_interval.is_zero() {
            left
        } else {
            // Catch up when the loop was late, like a model that kept going.
            let late = now.saturating_duration_since(w.next_due);
            let extra = (late.as_nanos() / self.cfg.token_interval.as_nanos()).min(u128::from(u32::MAX)) as u32;
            extra.saturating_add(1).min(left)
        };
        n.min(TOKENS_PER_POLL_MAX)
    }
}

impl Backend for Synthetic {
    fn name(&self) -> &str {
        "synthetic"
    }

    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject> {
        if self.stats.active as usize >= self.cfg.active_max {
            return Err(Reject::new(code::OVERLOADED, "synthetic backend at capacity"));
        }
        let work = Work {
            id: job.id,
            seed: prompt_hash(job.prompt) ^ job.params.seed,
            max_tokens: job.params.max_tokens,
            produced: 0,
            temperature: job.params.temperature,
            top_k: job.params.top_k,
            top_p: job.params.top_p,
            next_due: io.now(),
            paused: false,
            sched: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                let sched = self.works[s as usize].sched;
                self.works[s as usize] = Work { sched, ..work };
                s
            }
            None => {
                self.works.push(work);
                (self.works.len() - 1) as u32
            }
        };
        self.index.insert(job.id, slot);
        self.stats.active += 1;
        self.stats.started += 1;
        // Prefill starts when the work gets its slot (now), not when the
        // request arrived: a request that waited for a slot, here or on
        // another core, still takes the model's full TTFT.
        self.schedule(slot, io.now() + self.cfg.ttft);
        Ok(())
    }

    fn cancel(&mut self, id: WorkId, _io: &mut dyn Io) {
        if let Some(&slot) = self.index.get(&id) {
            self.stats.cancelled += 1;
            self.remove(slot);
        }
    }

    fn pause(&mut self, id: WorkId) {
        if let Some(&slot) = self.index.get(&id) {
            let w = &mut self.works[slot as usize];
            if !w.paused {
                w.paused = true;
                w.sched = w.sched.wrapping_add(1);
                self.stats.paused += 1;
            }
        }
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        if let Some(&slot) = self.index.get(&id) {
            let w = &mut self.works[slot as usize];
            if w.paused {
                w.paused = false;
                self.stats.paused -= 1;
                let due = w.next_due.max(io.now());
                self.schedule(slot, due);
            }
        }
    }

    fn complete(&mut self, _tag: u64, _result: i32, _flags: u32, _io: &mut dyn Io, _sink: &mut dyn Sink) {
        unreachable!("the synthetic backend submits no ring operations")
    }

    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        let now = io.now();
        // Gather every token due now across all streams: one picker call.
        self.rows.clear();
        self.row_owner.clear();
        while let Some(((due, slot, sched), from_fifo)) = self.next_entry() {
            if due > now {
                break;
            }
            if from_fifo {
                self.fifo.pop_front();
            } else {
                self.heap.pop();
            }
            let w = &self.works[slot as usize];
            if w.sched != sched || w.paused {
                continue;
            }
            let n = self.due_tokens(slot, now);
            self.row_owner.push((slot, n));
            for k in 0..n {
                self.rows.push(PickRow {
                    seed: w.seed,
                    position: u64::from(w.produced + k),
                    temperature: w.temperature,
                    top_k: w.top_k,
                    top_p: w.top_p,
                });
            }
        }
        if !self.rows.is_empty() {
            self.ids.resize(self.rows.len(), 0);
            if let Err(e) = self.picker.pick(&self.rows, &mut self.ids) {
                let owners = std::mem::take(&mut self.row_owner);
                for &(slot, _) in &owners {
                    sink.error(self.works[slot as usize].id, code::INTERNAL, &e);
                    self.stats.failed += 1;
                    self.remove(slot);
                }
                self.row_owner = owners;
                return self.next_entry().map(|((due, _, _), _)| due);
            }
        }
        let mut row = 0;
        for i in 0..self.row_owner.len() {
            let (slot, n) = self.row_owner[i];
            let mut gone = false;
            let mut delivered = 0;
            for k in 0..n as usize {
                let id = self.works[slot as usize].id;
                let word = self.vocab.word(self.ids[row + k]);
                delivered += 1;
                match sink.token(id, word) {
                    Delivery::Accepted => {}
                    Delivery::Pause => {
                        self.pause(id);
                        break;
                    }
                    Delivery::Gone => {
                        gone = true;
                        break;
                    }
                }
            }
            row += n as usize;
            if gone {
                self.stats.cancelled += 1;
                self.remove(slot);
                continue;
            }
            let w = &mut self.works[slot as usize];
            w.produced += delivered;
            if w.produced == w.max_tokens {
                sink.end(w.id, FinishReason::Length);
                self.remove(slot);
            } else if !w.paused {
                let due = if self.cfg.token_interval.is_zero() {
                    now
                } else {
                    w.next_due + self.cfg.token_interval * delivered
                };
                self.schedule(slot, due);
            } else {
                // Resumed later from where it stopped.
                w.next_due = if self.cfg.token_interval.is_zero() {
                    now
                } else {
                    w.next_due + self.cfg.token_interval * delivered
                };
            }
        }
        self.next_entry().map(|((due, _, _), _)| due)
    }

    fn stats(&self) -> BackendStats {
        BackendStats {
            servers: 1,
            servers_up: 1,
            ..self.stats
        }
    }

    fn active(&self) -> u64 {
        self.stats.active
    }

    fn has_capacity(&self) -> bool {
        (self.stats.active as usize) < self.cfg.active_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnse_proto::Params;

    struct TestIo(Instant);
    impl Io for TestIo {
        fn now(&self) -> Instant {
            self.0
        }
        unsafe fn submit(&mut self, _tag: u64, _entry: io_uring::squeue::Entry) {
            unreachable!()
        }
    }

    #[derive(Default)]
    struct Collect {
        text: Vec<u8>,
        tokens: u32,
        ended: Option<FinishReason>,
        pause_at: Option<u32>,
    }
    impl Sink for Collect {
        fn token(&mut self, _id: WorkId, text: &[u8]) -> Delivery {
            self.text.extend_from_slice(text);
            self.tokens += 1;
            if Some(self.tokens) == self.pause_at {
                Delivery::Pause
            } else {
                Delivery::Accepted
            }
        }
        fn end(&mut self, _id: WorkId, reason: FinishReason) {
            self.ended = Some(reason);
        }
        fn error(&mut self, _id: WorkId, _code: u32, _message: &str) {
            panic!("no errors expected")
        }
    }

    fn backend(ttft_ms: u64, interval_ms: u64) -> Synthetic {
        let cfg = SyntheticConfig {
            ttft: Duration::from_millis(ttft_ms),
            token_interval: Duration::from_millis(interval_ms),
            ..Default::default()
        };
        Synthetic::new(cfg, Vocab::shared_arc().clone(), Box::new(HashPicker))
    }

    fn job(now: Instant, max_tokens: u32) -> Job<'static> {
        Job {
            id: WorkId(7),
            params: Params {
                max_tokens,
                seed: 3,
                ..Params::default()
            },
            prompt: "hello",
            arrived: now,
            chat: None,
            session: None,
        }
    }

    #[test]
    fn zero_delay_produces_expected_text() {
        let mut b = backend(0, 0);
        let t0 = Instant::now();
        let mut io = TestIo(t0);
        b.start(job(t0, 40), &mut io).unwrap();
        let mut sink = Collect::default();
        assert_eq!(b.poll(&mut io, &mut sink), None);
        assert_eq!(sink.tokens, 40);
        assert_eq!(sink.ended, Some(FinishReason::Length));
        assert_eq!(sink.text, expected_text("hello", 3, 40));
        assert!(std::str::from_utf8(&sink.text).is_ok());
        assert_eq!(b.stats().active, 0);
    }

    #[test]
    fn paced_by_ttft_and_interval() {
        let mut b = backend(10, 2);
        let t0 = Instant::now();
        let mut io = TestIo(t0);
        b.start(job(t0, 5), &mut io).unwrap();
        let mut sink = Collect::default();
        assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(10)));
        assert_eq!(sink.tokens, 0);
        io.0 = t0 + Duration::from_millis(10);
        assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(12)));
        assert_eq!(sink.tokens, 1);
        // Late loop: catches up with every token due by then.
        io.0 = t0 + Duration::from_millis(16);
        b.poll(&mut io, &mut sink);
        assert_eq!(sink.tokens, 4);
        io.0 = t0 + Duration::from_millis(18);
        assert_eq!(b.poll(&mut io, &mut sink), None);
        assert_eq!(sink.ended, Some(FinishReason::Length));
    }

    #[test]
    fn pause_stops_until_resume() {
        let mut b = backend(0, 0);
        let t0 = Instant::now();
        let mut io = TestIo(t0);
        b.start(job(t0, 10), &mut io).unwrap();
        let mut sink = Collect {
            pause_at: Some(3),
            ..Default::default()
        };
        assert_eq!(b.poll(&mut io, &mut sink), None, "paused work is not scheduled");
        assert_eq!(sink.tokens, 3);
        assert_eq!(b.stats().paused, 1);
        b.resume(WorkId(7), &mut io);
        b.poll(&mut io, &mut sink);
        assert_eq!(sink.tokens, 10);
        assert_eq!(sink.text, expected_text("hello", 3, 10));
    }

    #[test]
    fn cancel_frees_work() {
        let mut b = backend(5, 5);
        let t0 = Instant::now();
        let mut io = TestIo(t0);
        b.start(job(t0, 10), &mut io).unwrap();
        b.cancel(WorkId(7), &mut io);
        assert_eq!(b.stats().active, 0);
        let mut sink = Collect::default();
        io.0 = t0 + Duration::from_secs(1);
        assert_eq!(b.poll(&mut io, &mut sink), None);
        assert_eq!(sink.tokens, 0);
    }

    /// Entries out of due order (a late stream catching up, a resume) go
    /// to the heap beside the FIFO; tokens still come in due order and the
    /// next wake-up is the earlier of the two heads.
    #[test]
    fn fifo_and_heap_together_keep_due_order() {
        let mut b = backend(5, 10);
        let t0 = Instant::now();
        let mut io = TestIo(t0);
        let mut a = job(t0, 3);
        a.id = WorkId(1);
        b.start(a, &mut io).unwrap(); // due t0+5 (FIFO)
        io.0 = t0 + Duration::from_millis(1);
        let mut c = job(io.0, 3);
        c.id = WorkId(2);
        b.start(c, &mut io).unwrap(); // due t0+6 (FIFO)
        b.pause(WorkId(1));
        io.0 = t0 + Duration::from_millis(2);
        b.resume(WorkId(1), &mut io); // due t0+5 again, before the FIFO's back: heap
        let mut sink = Collect::default();
        assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(5)));
        io.0 = t0 + Duration::from_millis(5);
        assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(6)));
        assert_eq!(sink.tokens, 1, "only the first stream was due");
        io.0 = t0 + Duration::from_millis(100);
        assert_eq!(b.poll(&mut io, &mut sink), None);
        assert_eq!(sink.tokens, 6);
        assert_eq!(b.stats().active, 0);
    }
}
