//! Scheduling: a checked REQUEST takes a stream slot and either starts on
//! this core's backend now or becomes a task on this core's deque of the
//! process's work-stealing scheduler (`crate::tasks`; 429 past its
//! admission bound). `admit` starts queued work as capacity frees: this
//! core's own tasks first (highest priority, oldest first), then, with
//! balancing on and only when this core would otherwise sleep, the
//! injector's and other cores' (steal-half). A stolen task runs here for
//! its owner (`steal.rs`).

use cnse_backend::Job;
use cnse_proto::code;
use cnse_sched::{CancelOutcome, SchedError};

use super::frames::Admitted;
use super::{work_id, Session};
use crate::stream::Phase;
use crate::tasks::{Balance, ServeTask};
use crate::transport::Transport;

impl<T: Transport> Session<T> {
    /// Starts or queues an admitted request; `Err` is the stream's ERROR.
    pub(crate) fn schedule(&mut self, slot: u32, a: Admitted<'_>) -> Result<(), (u32, &'static str)> {
        let cfg = &self.tables.cfg;
        if self.tables.conns[slot as usize].streams.len() >= cfg.streams_per_conn_max {
            return Err((code::OVERLOADED, "too many open streams on this connection"));
        }
        let run_now = self.core.own_is_empty() && self.backend.has_capacity();
        if !run_now && self.tasks.sched.counts().live >= self.tasks.sched.queued_max() {
            return Err((code::OVERLOADED, "admission queue full, retry later"));
        }
        let key = a.session.unwrap_or("");
        if a.req.prompt.len() + key.len() > self.tables.mem_left() {
            return Err((code::OVERLOADED, "memory budget exhausted, retry later"));
        }
        let Some(sslot) = self.tables.stream_free.pop() else {
            return Err((code::OVERLOADED, "stream table full, retry later"));
        };
        let t = &mut self.tables;
        t.n.requests += 1;
        t.n.streams_open += 1;
        let s = &mut t.streams[sslot as usize];
        s.phase = Phase::Queued;
        s.conn = slot;
        s.client_id = a.stream_id;
        s.credit = a.credit;
        s.sent = 0;
        s.paused = false;
        s.remote = None;
        s.arrived = t.now;
        s.arrived_us = t.now_us;
        s.parsed = if t.stages.is_some() {
            std::time::Instant::now()
        } else {
            t.now
        };
        s.produced = None;
        s.last_us = t.now_us;
        s.first_us = None;
        s.failed_over = false;
        s.params = a.req.params;
        s.http.chat = a.chat.is_some();
        t.conns[slot as usize].streams.push(a.stream_id, sslot);
        if run_now {
            // Straight from the frame: the backend copies what it keeps.
            self.tables.n.ran_local += 1;
            self.started_since_poll += 1;
            let job = Job {
                id: work_id(sslot, self.tables.streams[sslot as usize].gen),
                params: a.req.params,
                prompt: a.req.prompt,
                arrived: self.tables.now,
                chat: a.chat,
                session: a.session,
            };
            self.start_job(sslot, job);
            return Ok(());
        }
        // Queued: the request's text waits in the stream's reused buffers,
        // then travels with its task.
        let s = &mut t.streams[sslot as usize];
        s.prompt.clear();
        s.http.messages.clear();
        let before = s.prompt.capacity() + s.http.messages.capacity();
        // The key (at most 256 bytes, checked at the edge) goes in front of
        // the prompt in the same reused buffer.
        s.session_len = u16::try_from(key.len()).expect("session keys are at most 256 bytes");
        s.prompt.push_str(key);
        s.prompt.push_str(a.req.prompt);
        s.http.messages.push_str(a.chat.unwrap_or(""));
        t.mem_held = t.mem_held - before + s.prompt.capacity() + s.http.messages.capacity();
        if let Err(code) = self.push_task(sslot) {
            // Refused after all (a race with other cores filling the
            // bound, or shutdown): the stream ends with the ERROR.
            let message = if code == code::SHUTTING_DOWN {
                "server shutting down"
            } else {
                "admission queue full, retry later"
            };
            self.tables.fail(sslot, code, message);
        }
        Ok(())
    }

    /// Moves a queued stream's request into a task on this core's deque.
    fn push_task(&mut self, sslot: u32) -> Result<(), u32> {
        let tokens_max = self.tables.cfg.stream_buffered_tokens_max as u64;
        let s = &mut self.tables.streams[sslot as usize];
        let away = s.prompt.capacity() + s.http.messages.capacity();
        let task = ServeTask {
            sslot,
            gen: s.gen,
            params: s.params,
            prompt: std::mem::take(&mut s.prompt),
            session_len: s.session_len,
            messages: std::mem::take(&mut s.http.messages),
            chat: s.http.chat,
            arrived: s.arrived,
        };
        let reuse = s.task.take();
        match self
            .core
            .push_reusing(s.params.priority, cnse_sched::Job::local(task), reuse, tokens_max)
        {
            Ok((id, token)) => {
                s.task = Some(token);
                s.task_id = id;
                s.away = away;
                self.tasks.wake_idle(self.core.index());
                Ok(())
            }
            Err((e, job)) => {
                s.prompt = job.payload.prompt;
                s.http.messages = job.payload.messages;
                Err(match e {
                    SchedError::Closed => code::SHUTTING_DOWN,
                    _ => code::OVERLOADED,
                })
            }
        }
    }

    /// Starts queued work while the backend has capacity: this core's own
    /// tasks first; the injector's and other cores' only when this core
    /// ran out of its own work and was about to sleep (`allow_steal`), so
    /// that busy cores under a balanced load do not trade tasks needlessly.
    /// Returns how many tasks it took.
    pub(super) fn admit(&mut self) -> usize {
        let steal = std::mem::take(&mut self.steal_ok) && self.tasks.balance == Balance::Steal;
        let mut n = 0;
        while self.backend.has_capacity() {
            let next = if self.core.own_is_empty() {
                if !steal || self.tasks.sched.counts().live == 0 {
                    break;
                }
                self.core.next_task()
            } else {
                self.core.next_own_task()
            };
            let Some(claimed) = next else { break };
            n += 1;
            let own =
                claimed.task.payload.origin == cnse_sched::Origin::Local && claimed.task.owner == self.core.index();
            if own {
                self.start_own(claimed);
            } else {
                self.start_foreign(claimed);
            }
        }
        n
    }

    /// One of this core's own queued tasks gets the backend slot.
    fn start_own(&mut self, claimed: cnse_sched::Claimed<crate::tasks::Task>) {
        let cnse_sched::Claimed { task, .. } = claimed;
        // Dropping the claim finishes the task: from here the stream is
        // this core's (cancel goes to the backend, as for a direct start).
        let p = task.payload.payload;
        let s = &mut self.tables.streams[p.sslot as usize];
        if s.gen != p.gen || s.phase != Phase::Queued {
            return;
        }
        s.prompt = p.prompt;
        s.http.messages = p.messages;
        s.away = 0;
        self.tables.n.ran_local += 1;
        self.start_stream(p.sslot);
    }

    /// Starts a queued stream's request from its buffers.
    fn start_stream(&mut self, sslot: u32) {
        let s = &self.tables.streams[sslot as usize];
        let (session, prompt) = crate::stream::key_and_prompt(&s.prompt, s.session_len);
        let job = Job {
            id: work_id(sslot, s.gen),
            params: s.params,
            prompt,
            arrived: s.arrived,
            chat: s.http.chat.then_some(s.http.messages.as_str()),
            session,
        };
        let (backend, io) = (&mut self.backend, &mut self.io);
        let started = backend.start(job, io);
        self.started(sslot, started);
    }

    /// Starts a request that never waited.
    fn start_job(&mut self, sslot: u32, job: Job<'_>) {
        let started = self.backend.start(job, &mut self.io);
        self.started(sslot, started);
    }

    fn started(&mut self, sslot: u32, started: Result<(), cnse_backend::Reject>) {
        let t = &mut self.tables;
        match started {
            Ok(()) => t.streams[sslot as usize].phase = Phase::Running,
            Err(reject) => t.fail(sslot, reject.code, &reject.message),
        }
    }

    /// Ends the backend's part of a stream (no frame is written): the local
    /// backend's work, the task wherever it is queued, or (the task runs on
    /// another core) a cancel its runner sees when woken.
    pub(crate) fn stop_stream(&mut self, sslot: u32) {
        let s = &self.tables.streams[sslot as usize];
        match s.phase {
            Phase::Running if s.remote.is_none() => self.backend.cancel(work_id(sslot, s.gen), &mut self.io),
            Phase::Running | Phase::Queued => {
                let Some(token) = &s.task else { return };
                if token.cancel() == CancelOutcome::Signalled {
                    if let Some(runner) = token.window().runner() {
                        self.tasks.wake_core(runner);
                    }
                }
            }
            Phase::Finished(_) | Phase::Failed | Phase::Free => {}
        }
    }
}
