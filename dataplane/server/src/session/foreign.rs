//! Work this core runs for another core's stream (a stolen task): the
//! backend's sink calls for it land here instead of in a stream's queue.
//! Tokens gather in a batch per work and leave once per turn
//! (`Session::flush_foreign`); the task's window pauses the work when the
//! owner's stream has no room, and a cancel the owner signalled ends it.

use cnse_backend::{Delivery, FinishReason, WorkId};
use cnse_sched::Claimed;

use crate::tasks::{Batch, Task, TaskEnd};

/// Set in a work id's slot half for foreign work (stream slots stay below
/// it: tables are far smaller than 2^31).
pub(crate) const FOREIGN_BIT: u32 = 1 << 31;

pub(crate) fn is_foreign(id: WorkId) -> bool {
    (id.0 as u32) & FOREIGN_BIT != 0
}

pub(crate) fn foreign_id(index: u32, gen: u32) -> WorkId {
    WorkId((u64::from(gen) << 32) | u64::from(FOREIGN_BIT | index))
}

pub(crate) struct ForeignWork {
    pub claimed: Claimed<Task>,
    /// Tokens handed over by the backend so far (the window counts these).
    pub emitted: u64,
    /// The backend is paused for lack of window.
    pub paused: bool,
    /// Tokens not yet sent to the owner.
    pub batch: Batch,
    /// Set by the backend's end or error.
    pub end: Option<TaskEnd>,
    /// A cancel ended it (the backend dropped the work).
    pub gone: bool,
    /// The backend continued it on another model server (`Sink::failed_over`).
    pub failed_over: bool,
    pub dirty: bool,
}

/// The foreign works of one core: a slab with generations, like the
/// stream table, grown on demand up to the backend's capacity.
#[derive(Default)]
pub(crate) struct Foreign {
    pub works: Vec<Option<ForeignWork>>,
    gens: Vec<u32>,
    free: Vec<u32>,
    pub dirty: Vec<u32>,
    pub live: usize,
    /// An owner's inbox was full: try again next turn.
    pub retry: bool,
}

impl Foreign {
    /// Takes a slot for `w`: its index and the backend's work id.
    pub fn insert(&mut self, w: ForeignWork) -> (u32, WorkId) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.works.push(None);
                self.gens.push(0);
                (self.works.len() - 1) as u32
            }
        };
        self.works[index as usize] = Some(w);
        self.live += 1;
        self.mark_dirty(index);
        (index, foreign_id(index, self.gens[index as usize]))
    }

    /// Frees `index` (its work was sent off as finished).
    pub fn remove(&mut self, index: u32) {
        self.gens[index as usize] = self.gens[index as usize].wrapping_add(1);
        self.free.push(index);
        self.live -= 1;
    }

    pub fn id_of(&self, index: u32) -> WorkId {
        foreign_id(index, self.gens[index as usize])
    }

    fn get(&mut self, id: WorkId) -> Option<(u32, &mut ForeignWork)> {
        let index = (id.0 as u32) & !FOREIGN_BIT;
        let gen = (id.0 >> 32) as u32;
        if self.gens.get(index as usize) != Some(&gen) {
            return None;
        }
        let w = self.works[index as usize].as_mut()?;
        Some((index, w))
    }

    pub fn mark_dirty(&mut self, index: u32) {
        if let Some(w) = self.works[index as usize].as_mut() {
            if !w.dirty {
                w.dirty = true;
                self.dirty.push(index);
            }
        }
    }

    /// The sink's `token` for foreign work.
    pub fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        let Some((index, w)) = self.get(id) else {
            return Delivery::Gone;
        };
        if w.gone || w.end.is_some() {
            return Delivery::Gone;
        }
        if w.claimed.cancel_requested() {
            w.gone = true;
            self.mark_dirty(index);
            return Delivery::Gone;
        }
        w.batch.push(text);
        w.emitted += 1;
        let window = w.claimed.window();
        let pause = !window.may_resume(w.emitted) && window.park(w.emitted);
        w.paused = pause;
        self.mark_dirty(index);
        if pause {
            Delivery::Pause
        } else {
            Delivery::Accepted
        }
    }

    pub fn end(&mut self, id: WorkId, end: TaskEnd) {
        if let Some((index, w)) = self.get(id) {
            if !w.gone && w.end.is_none() {
                w.end = Some(end);
                self.mark_dirty(index);
            }
        }
    }

    pub fn finished(&mut self, id: WorkId, reason: FinishReason) {
        let failed_over = self.get(id).is_some_and(|(_, w)| w.failed_over);
        if failed_over {
            self.end(id, TaskEnd::FinishedFailedOver(reason));
        } else {
            self.end(id, TaskEnd::Finished(reason));
        }
    }

    pub fn failed_over(&mut self, id: WorkId) {
        if let Some((_, w)) = self.get(id) {
            w.failed_over = true;
        }
    }
}
