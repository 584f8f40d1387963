//! Work stealing in the session: running another core's task here, sending
//! its tokens home, and, on the owner's side, taking them from the inbox
//! into the stream's queue (docs/SCHEDULER.md, "In the server").
//!
//! Runner: `start_foreign` (a stolen task gets this core's backend) →
//! tokens into the work's batch (`foreign.rs`, the sink) → `flush_foreign`
//! once per turn (`Router::emit`; the last one `Router::complete`, with the
//! prompt buffers) → `scan_foreign` when woken (a cancel, or window to
//! resume a paused work).
//!
//! Owner: `drain_inbox` → tokens into the stream's queue → `grant_remote`
//! from the flush as the queue drains (the task's window; a parked runner
//! is woken).

use std::time::Instant;

use cnse_backend::{Job, WorkId};
use cnse_proto::code;
use cnse_sched::{Busy, Claimed, InboxFull, Status};

use super::foreign::ForeignWork;
use super::Session;
use crate::stream::{Phase, Remote};
use crate::tasks::{Msg, Task, TaskEnd, TaskMsg};
use crate::transport::Transport;

impl<T: Transport> Session<T> {
    /// A task stolen from another core gets this core's backend.
    pub(super) fn start_foreign(&mut self, claimed: Claimed<Task>) {
        // Before the cancel check: an owner that cancels after this store
        // wakes this core; one that cancelled before is seen below.
        claimed.window().set_runner(self.core.index());
        self.tables.n.stolen_in += 1;
        let gone = claimed.cancel_requested();
        let batch = self.tasks.pool.take();
        let (index, id) = self.tables.foreign.insert(ForeignWork {
            claimed,
            emitted: 0,
            paused: false,
            batch,
            end: None,
            gone,
            failed_over: false,
            dirty: false,
        });
        if gone {
            return;
        }
        let t = &mut self.tables;
        let w = t.foreign.works[index as usize].as_ref().expect("inserted above");
        let p = &w.claimed.task.payload.payload;
        let (session, prompt) = crate::stream::key_and_prompt(&p.prompt, p.session_len);
        let job = Job {
            id,
            params: p.params,
            prompt,
            arrived: p.arrived,
            chat: p.chat.then_some(p.messages.as_str()),
            session,
        };
        if let Err(reject) = self.backend.start(job, &mut self.io) {
            t.foreign.end(
                id,
                TaskEnd::Error {
                    code: reject.code,
                    message: reject.message,
                },
            );
        }
    }

    /// Sends each foreign work's tokens of this turn to its owner, and the
    /// ended ones' last message. An owner's full inbox keeps them for the
    /// next turn (the window bounds what can pile up).
    pub(super) fn flush_foreign(&mut self) {
        let f = &mut self.tables.foreign;
        if f.dirty.is_empty() {
            return;
        }
        f.retry = false;
        let mut dirty = std::mem::take(&mut f.dirty);
        for &index in &dirty {
            let f = &mut self.tables.foreign;
            let Some(mut w) = f.works[index as usize].take() else {
                continue;
            };
            w.dirty = false;
            let p = &w.claimed.task.payload.payload;
            let (sslot, gen) = (p.sslot, p.gen);
            if w.end.is_some() || w.gone {
                let p = &mut w.claimed.task.payload.payload;
                let buffers = (std::mem::take(&mut p.prompt), std::mem::take(&mut p.messages));
                let batch = std::mem::take(&mut w.batch);
                let msg = TaskMsg {
                    sslot,
                    gen,
                    batch,
                    end: w.end.take(),
                    buffers: Some(buffers),
                };
                match self.tasks.router.complete(w.claimed, Some(msg)) {
                    Ok(()) => {
                        f.remove(index);
                        continue;
                    }
                    Err(Busy(claimed, msg)) => {
                        let msg = msg.expect("handed back with its result");
                        let mut back = ForeignWork {
                            claimed,
                            end: msg.end,
                            batch: msg.batch,
                            ..w
                        };
                        if let Some((prompt, messages)) = msg.buffers {
                            let p = &mut back.claimed.task.payload.payload;
                            p.prompt = prompt;
                            p.messages = messages;
                        }
                        f.works[index as usize] = Some(back);
                        f.retry = true;
                    }
                }
            } else if !w.batch.is_empty() {
                let batch = std::mem::replace(&mut w.batch, self.tasks.pool.take());
                let msg = TaskMsg {
                    sslot,
                    gen,
                    batch,
                    end: None,
                    buffers: None,
                };
                if let Err(InboxFull(msg)) = self.tasks.router.emit(&w.claimed, msg) {
                    let fresh = std::mem::replace(&mut w.batch, msg.batch);
                    self.tasks.pool.give(fresh);
                    f.retry = true;
                }
                f.works[index as usize] = Some(w);
            } else {
                f.works[index as usize] = Some(w);
            }
        }
        let f = &mut self.tables.foreign;
        if f.retry {
            for &index in &dirty {
                f.mark_dirty(index);
            }
        }
        dirty.clear();
        if f.dirty.is_empty() {
            // Keep the list's capacity.
            f.dirty = dirty;
        }
    }

    /// Woken: applies the owners' cancels to foreign works, and resumes
    /// paused ones whose window opened.
    pub(super) fn scan_foreign(&mut self) {
        for index in 0..self.tables.foreign.works.len() as u32 {
            let f = &mut self.tables.foreign;
            let id: WorkId = f.id_of(index);
            let Some(w) = f.works[index as usize].as_mut() else {
                continue;
            };
            if w.gone || w.end.is_some() {
                continue;
            }
            if w.claimed.cancel_requested() {
                w.gone = true;
                f.mark_dirty(index);
                self.backend.cancel(id, &mut self.io);
            } else if w.paused && w.claimed.window().may_resume(w.emitted) {
                w.paused = false;
                self.backend.resume(id, &mut self.io);
            }
        }
    }

    /// Takes the tokens and ends that runners on other cores sent to this
    /// core's streams.
    pub(super) fn drain_inbox(&mut self) {
        let core = self.core.index();
        if !self.tasks.router.local.pending(core) {
            return;
        }
        let mut msgs = std::mem::take(&mut self.inbox_buf);
        self.tasks.router.local.drain_into(core, &mut msgs);
        for m in msgs.drain(..) {
            self.on_task_msg(m);
        }
        self.inbox_buf = msgs;
    }

    fn on_task_msg(&mut self, m: Msg) {
        let Some(msg) = m.result else {
            return self.on_bare_end(m.id, m.status);
        };
        let TaskMsg {
            sslot,
            gen,
            batch,
            end,
            buffers,
        } = msg;
        let tokens_max = self.tables.cfg.stream_buffered_tokens_max as u64;
        let timed = self.tables.stages.is_some();
        let t = &mut self.tables;
        let Some(s) = t.streams.get_mut(sslot as usize) else {
            self.tasks.pool.give(batch);
            return;
        };
        if s.gen != gen || !matches!(s.phase, Phase::Queued | Phase::Running) {
            // The stream is gone (cancelled, its connection closed).
            self.tasks.pool.give(batch);
            return;
        }
        if s.phase == Phase::Queued {
            s.phase = Phase::Running;
            s.remote = Some(Remote {
                received: 0,
                granted: tokens_max,
            });
            t.n.stolen_out += 1;
        }
        let n = batch.lens.len() as u64;
        if n > 0 {
            if timed && s.produced.is_none() {
                s.produced = Some(Instant::now());
            }
            for tok in batch.tokens() {
                s.queue.push(tok);
            }
            if let Some(r) = &mut s.remote {
                r.received += n;
            }
            t.n.tokens_produced += n;
        }
        self.tasks.pool.give(batch);
        if let Some((prompt, messages)) = buffers {
            if s.prompt.capacity() == 0 && s.http.messages.capacity() == 0 {
                s.prompt = prompt;
                s.http.messages = messages;
                s.away = 0;
            }
        }
        let conn = s.conn;
        if m.last {
            match (m.status, end) {
                (Status::Ok, Some(TaskEnd::Finished(reason))) => s.phase = Phase::Finished(reason),
                (Status::Ok, Some(TaskEnd::FinishedFailedOver(reason))) => {
                    s.failed_over = true;
                    s.phase = Phase::Finished(reason);
                }
                (Status::Ok, Some(TaskEnd::Error { code, message })) => t.fail(sslot, code, &message),
                (Status::Lost, _) => t.fail(sslot, code::BACKEND_FAILED, "the core running this stream was lost"),
                _ => t.fail(sslot, code::BACKEND_FAILED, "the stream's work ended without a result"),
            }
        }
        t.mark_dirty(conn);
    }

    /// An answer without a result (the rank running the task was lost, or
    /// the task was cancelled before it ran elsewhere): finds the stream by
    /// its task id (rare: a scan of the stream table).
    fn on_bare_end(&mut self, task_id: u64, status: Status) {
        let t = &mut self.tables;
        let found = t.streams.iter().position(|s| {
            s.task_id == task_id && s.task.is_some() && matches!(s.phase, Phase::Queued | Phase::Running)
        });
        let Some(sslot) = found else { return };
        let (code, message) = match status {
            Status::Lost => (code::BACKEND_FAILED, "the rank running this stream was lost"),
            _ => (code::BACKEND_FAILED, "the stream's work ended without a result"),
        };
        t.fail(sslot as u32, code, message);
    }

    /// The owner's stream drained: lets the runner emit up to the room now
    /// free, waking it if it parked.
    pub(crate) fn grant_remote(&mut self, sslot: u32) {
        let tokens_max = self.tables.cfg.stream_buffered_tokens_max as u64;
        let s = &mut self.tables.streams[sslot as usize];
        let (Some(r), Some(token)) = (&mut s.remote, &s.task) else {
            return;
        };
        let queued = s.queue.tokens() as u64;
        if s.phase != Phase::Running || queued > tokens_max / 2 {
            return;
        }
        let target = r.received + (tokens_max - queued);
        if target <= r.granted {
            return;
        }
        r.granted = target;
        if token.window().grant(target) {
            if let Some(runner) = token.window().runner() {
                self.tasks.wake_core(runner);
            }
        }
    }
}
