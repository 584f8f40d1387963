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
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_proto::code;

use crate::{Backend, BackendFactory, BackendStats, Delivery, FinishReason, Io, Job, Reject, Sink, WorkId};

mod index;
mod text;

use index::WorkIndex;

pub use text::{
    expected_text, prompt_hash, splitmix64, token_count, HashPicker, PickRow, PickRun, Picker, PickerFactory, Vocab,
    WordRun,
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

pub struct Synthetic {
    cfg: SyntheticConfig,
    vocab: Arc<Vocab>,
    picker: Box<dyn Picker>,
    works: Vec<Work>,
    index: WorkIndex,
    free: Vec<u32>,
    /// Schedule entries `(due, slot, sched)`. Most arrive in due order (a
    /// fixed TTFT after the turn's `now`; `now` itself with a zero token
    /// interval) and go to `fifo`, O(1) each; the rest (paced tokens that
    /// catch up, resumes) to `heap`. The next due entry is the earlier
    /// head of the two.
    fifo: VecDeque<(Instant, u32, u32)>,
    heap: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// A poll's due work `(slot, tokens owed)`, then one batch of its pick
    /// runs and the ids picked for them (capacity kept across polls).
    due: Vec<(u32, u32)>,
    runs: Vec<PickRun>,
    ids: Vec<u32>,
    /// One work's text of a batch, handed to the sink in one call.
    run: WordRun,
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
            index: WorkIndex::with_capacity(reserve),
            free: Vec::with_capacity(reserve),
            fifo: VecDeque::with_capacity(reserve),
            heap: BinaryHeap::with_capacity(reserve),
            runs: Vec::new(),
            due: Vec::new(),
            ids: Vec::new(),
            run: WordRun::default(),
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

    fn slot_of(&self, id: WorkId) -> Option<u32> {
        self.index.get(id, |s| self.works[s as usize].id)
    }

    fn remove(&mut self, slot: u32) {
        let w = &mut self.works[slot as usize];
        self.index.remove(w.id, slot);
        w.sched = w.sched.wrapping_add(1);
        if w.paused {
            self.stats.paused -= 1;
        }
        w.paused = false;
        self.free.push(slot);
        self.stats.active -= 1;
    }

    /// Fills `self.runs` with the pick runs of the first works of `due`
    /// whose tokens fit the picker's batch (at least one work); returns how
    /// many works and tokens.
    fn fill_runs(&mut self, due: &[(u32, u32)]) -> (usize, usize) {
        let batch = self.picker.batch_rows().max(1);
        self.runs.clear();
        let mut tokens = 0;
        for &(slot, n) in due {
            if !self.runs.is_empty() && tokens + n as usize > batch {
                break;
            }
            let w = &self.works[slot as usize];
            self.runs.push(PickRun {
                first: PickRow {
                    seed: w.seed,
                    position: u64::from(w.produced),
                    temperature: w.temperature,
                    top_k: w.top_k,
                    top_p: w.top_p,
                },
                tokens: n,
            });
            tokens += n as usize;
        }
        (self.runs.len(), tokens)
    }

    /// Hands `owners`' picked tokens (`self.ids`, in the owners' order) to
    /// the sink, then ends, reschedules or parks each work.
    fn deliver(&mut self, owners: &[(u32, u32)], now: Instant, sink: &mut dyn Sink) {
        let mut row = 0;
        for &(slot, n) in owners {
            let id = self.works[slot as usize].id;
            self.run.clear();
            self.run.extend(&self.vocab, &self.ids[row..row + n as usize]);
            row += n as usize;
            let (taken, delivery) = sink.tokens(id, self.run.text(), self.run.lens());
            match delivery {
                Delivery::Accepted => {}
                Delivery::Pause => self.pause(id),
                Delivery::Gone => {
                    self.stats.cancelled += 1;
                    self.remove(slot);
                    continue;
                }
            }
            let delivered = taken as u32;
            let w = &mut self.works[slot as usize];
            w.produced += delivered;
            let next_due = if self.cfg.token_interval.is_zero() {
                now
            } else {
                w.next_due + self.cfg.token_interval * delivered
            };
            if w.produced == w.max_tokens {
                sink.end(w.id, FinishReason::Length);
                self.remove(slot);
            } else if !w.paused {
                self.schedule(slot, next_due);
            } else {
                // Resumed later from where it stopped.
                w.next_due = next_due;
            }
        }
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
        let works = &self.works;
        self.index.insert(job.id, slot, |s| works[s as usize].id);
        self.stats.active += 1;
        self.stats.started += 1;
        // Prefill starts when the work gets its slot (now), not when the
        // request arrived: a request that waited for a slot, here or on
        // another core, still takes the model's full TTFT.
        self.schedule(slot, io.now() + self.cfg.ttft);
        Ok(())
    }

    fn cancel(&mut self, id: WorkId, _io: &mut dyn Io) {
        if let Some(slot) = self.slot_of(id) {
            self.stats.cancelled += 1;
            self.remove(slot);
        }
    }

    fn pause(&mut self, id: WorkId) {
        if let Some(slot) = self.slot_of(id) {
            let w = &mut self.works[slot as usize];
            if !w.paused {
                w.paused = true;
                w.sched = w.sched.wrapping_add(1);
                self.stats.paused += 1;
            }
        }
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        if let Some(slot) = self.slot_of(id) {
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
        // Every work due now, with the tokens it owes. The set is fixed
        // before any token goes out: work rescheduled while delivering
        // waits for the next poll.
        self.due.clear();
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
            self.due.push((slot, n));
        }
        // Picked and delivered in batches of the picker's size (the hash
        // picker's 256 rows, a sampler's launch), whose rows and ids stay
        // in cache while their tokens go out.
        let due = std::mem::take(&mut self.due);
        let mut i = 0;
        while i < due.len() {
            let (works, tokens) = self.fill_runs(&due[i..]);
            let j = i + works;
            self.ids.resize(tokens, 0);
            if let Err(e) = self.picker.pick(&self.runs, &mut self.ids) {
                // Every work of this poll not yet served fails.
                for &(slot, _) in &due[i..] {
                    sink.error(self.works[slot as usize].id, code::INTERNAL, &e);
                    self.stats.failed += 1;
                    self.remove(slot);
                }
                break;
            }
            self.deliver(&due[i..j], now, sink);
            i = j;
        }
        self.due = due;
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
mod tests;
