//! Scheduling: a checked REQUEST takes a stream slot and either starts on
//! the backend now or waits in the bounded, priority-ordered admission
//! queue (429 beyond it); `admit` starts queued work as capacity frees.
//! This is the hand-off point where work stealing plugs in.

use std::time::Instant;

use cnse_backend::Job;
use cnse_proto::code;

use super::frames::Admitted;
use super::{work_id, Queued, Session};
use crate::stream::Phase;
use crate::transport::Transport;

impl<T: Transport> Session<T> {
    /// Starts or queues an admitted request; `Err` is the stream's ERROR.
    pub(crate) fn schedule(&mut self, slot: u32, a: Admitted<'_>) -> Result<(), (u32, &'static str)> {
        let cfg = &self.tables.cfg;
        if self.tables.conns[slot as usize].streams.len() >= cfg.streams_per_conn_max {
            return Err((code::OVERLOADED, "too many open streams on this connection"));
        }
        let run_now = self.queue.is_empty() && self.backend.has_capacity();
        if !run_now && self.queue.len() >= cfg.admission_queue_max {
            return Err((code::OVERLOADED, "admission queue full, retry later"));
        }
        if a.req.prompt.len() > self.tables.mem_left() {
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
        s.arrived = t.now;
        s.parsed = if t.stages.is_some() { Instant::now() } else { t.now };
        s.produced = None;
        s.last_progress = t.now;
        s.first_token = None;
        s.params = a.req.params;
        s.prompt.clear();
        s.http.messages.clear();
        s.http.chat = a.chat.is_some();
        let before = s.prompt.capacity() + s.http.messages.capacity();
        s.prompt.push_str(a.req.prompt);
        s.http.messages.push_str(a.chat.unwrap_or(""));
        t.mem_held = t.mem_held - before + s.prompt.capacity() + s.http.messages.capacity();
        let gen = s.gen;
        t.conns[slot as usize].streams.push((a.stream_id, sslot));
        if run_now {
            self.start_stream(sslot);
        } else {
            self.queue_order += 1;
            self.queue.push(Queued {
                priority: a.req.params.priority,
                order: std::cmp::Reverse(self.queue_order),
                slot: sslot,
                gen,
            });
        }
        Ok(())
    }

    /// Starts queued work while the backend has capacity.
    pub(super) fn admit(&mut self) {
        while let Some(top) = self.queue.peek() {
            if !self.backend.has_capacity() {
                break;
            }
            let (slot, gen) = (top.slot, top.gen);
            self.queue.pop();
            let s = &self.tables.streams[slot as usize];
            if s.gen != gen || s.phase != Phase::Queued {
                continue;
            }
            self.start_stream(slot);
        }
    }

    fn start_stream(&mut self, sslot: u32) {
        let t = &mut self.tables;
        let s = &mut t.streams[sslot as usize];
        s.phase = Phase::Running;
        let job = Job {
            id: work_id(sslot, s.gen),
            params: s.params,
            prompt: &s.prompt,
            arrived: s.arrived,
            chat: s.http.chat.then_some(s.http.messages.as_str()),
        };
        if let Err(reject) = self.backend.start(job, &mut self.io) {
            t.fail(sslot, reject.code, &reject.message);
        }
    }

    /// Ends the backend's part of a stream (no frame is written).
    pub(crate) fn stop_stream(&mut self, sslot: u32) {
        let s = &self.tables.streams[sslot as usize];
        match s.phase {
            Phase::Running => self.backend.cancel(work_id(sslot, s.gen), &mut self.io),
            Phase::Queued => {
                let gen = s.gen;
                self.queue.retain(|q| !(q.slot == sslot && q.gen == gen));
            }
            Phase::Finished(_) | Phase::Failed | Phase::Free => {}
        }
    }
}
