//! One request's HTTP exchange with llama-server: the response decoder's
//! items become sink calls (tokens, end, error), and every way a stream
//! can end (finished, failed, timed out, gone, retried on a fresh
//! connection) is decided here.

use cnse_backend::{Delivery, Io, Sink};

use super::{Attempt, Conn, Flow, LlamaBackend, Phase, Task, CLOSES_AFTER_STREAM};
use crate::http::Item;
use crate::sse::{self, SseLine};

/// HTTP statuses after which another server may take the request.
fn retryable(status: u16) -> bool {
    status >= 500 || status == 429
}

impl LlamaBackend {
    pub(super) fn fail(
        &mut self,
        i: usize,
        code: u32,
        message: &str,
        down: bool,
        io: &mut dyn Io,
        sink: &mut dyn Sink,
    ) {
        let task = std::mem::replace(&mut self.slots[i].task, Task::None);
        if let Task::Stream(w) = task {
            self.by_id.remove(&w.id);
            self.stats.failed += 1;
            let full = format!("{message} ({})", self.url(i));
            sink.error(w.id, code, &full);
        }
        if down {
            self.mark_down(self.slots[i].upstream);
        }
        self.abort_conn(i, io);
        self.settle(i);
    }

    /// The connection failed under the slot's current task.
    pub(super) fn conn_failed(&mut self, i: usize, what: String, down: bool, io: &mut dyn Io, sink: &mut dyn Sink) {
        let committed = matches!(&self.slots[i].task, Task::Stream(w) if w.attempt == Attempt::Committed);
        if committed && self.retry_elsewhere(i, down, io, sink) {
            return;
        }
        match &mut self.slots[i].task {
            Task::Stream(w) if w.attempt == Attempt::PooledUnanswered => {
                // The server closed the pooled connection while idle: send
                // again on a fresh one once this one is closed.
                w.attempt = Attempt::Committed;
                self.llama.retried += 1;
                let slot = &self.slots[i];
                if slot.keep_alive
                    && slot
                        .idle_since
                        .is_some_and(|t| io.now().saturating_duration_since(t) < CLOSES_AFTER_STREAM)
                {
                    // Closed right after its last answer (llama-server
                    // b10434 does so after every stream), and before its
                    // watching RECV saw it.
                    self.mark_closes_after_stream(slot.upstream);
                }
                self.abort_conn(i, io);
            }
            Task::Stream(w) => {
                let msg = if w.delivered > 0 {
                    format!("llama-server failed mid-stream after {} tokens: {what}", w.delivered)
                } else {
                    format!("llama-server failed: {what}")
                };
                self.fail(i, 502, &msg, down, io, sink);
            }
            Task::Spare => {
                // Only a spare's CONNECT can fail here: the server is
                // unreachable, as a stream's failed connect would say.
                if down {
                    self.mark_down(self.slots[i].upstream);
                }
                self.abandon_conn(i, io);
            }
            Task::Health | Task::Drain | Task::None => self.abandon_conn(i, io),
        }
    }

    /// A failed or timed-out connection with no stream on it: a health check
    /// marks its server down; a drain that does not finish, or an idle
    /// pooled connection past its keep-alive, is just closed.
    fn abandon_conn(&mut self, i: usize, io: &mut dyn Io) {
        match std::mem::replace(&mut self.slots[i].task, Task::None) {
            Task::Health => {
                self.mark_down(self.slots[i].upstream);
                self.abort_conn(i, io);
            }
            _ => {
                self.abort_conn(i, io);
                self.settle(i);
            }
        }
    }

    /// The connection is closed: go on with the slot's task.
    pub(super) fn after_close(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        // A slot is free again: the next poll refills the spares.
        self.upkeep.spares_dirty = true;
        if let Task::Stream(_) = self.slots[i].task {
            // A retry on a fresh connection.
            if let Err(e) = self.open_connect(i, io) {
                self.fail(i, 502, &format!("socket: {e}"), false, io, sink);
            }
            return;
        }
        self.slots[i].task = Task::None;
        self.settle(i);
    }

    /// Runs the decoder over the received bytes and acts on each item.
    pub(super) fn process(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        loop {
            let slot = &mut self.slots[i];
            if let Task::Stream(w) = &slot.task {
                if w.flow == Flow::Paused {
                    slot.deadline = None;
                    return;
                }
            }
            let input = &slot.recv[slot.recv_pos..slot.recv_len];
            let (used, item) = match slot.dec.next(input) {
                Ok(r) => r,
                Err(e) => {
                    slot.recv_pos = slot.recv_len;
                    let what = format!("bad HTTP response: {e}");
                    return self.conn_failed(i, what, true, io, sink);
                }
            };
            slot.recv_pos += used;
            match item {
                Item::Pending => {
                    debug_assert_eq!(slot.recv_pos, slot.recv_len);
                    return self.need_more(i, io);
                }
                Item::Head(head) => {
                    slot.keep_alive = head.keep_alive;
                    match &mut slot.task {
                        Task::Health => {
                            let upstream = slot.upstream;
                            slot.task = Task::None;
                            if head.status == 200 {
                                self.mark_up(upstream);
                            } else {
                                self.mark_down(upstream);
                            }
                            self.abort_conn(i, io);
                            return;
                        }
                        Task::Stream(w) => {
                            if head.status != 200 {
                                w.phase = Phase::ErrorBody(head.status);
                            } else if !head.event_stream {
                                let msg = "answered 200 without a text/event-stream body";
                                return self.fail(i, 502, msg, true, io, sink);
                            } else {
                                w.phase = Phase::Streaming;
                            }
                        }
                        Task::Drain | Task::None | Task::Spare => {}
                    }
                }
                Item::Line => {
                    if !self.on_line(i, io, sink) {
                        return;
                    }
                }
                Item::End => return self.on_end(i, io, sink),
            }
        }
    }

    /// One body line of the slot's response. Returns false when processing
    /// must stop (the stream ended, failed or paused).
    pub(super) fn on_line(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) -> bool {
        let slot = &mut self.slots[i];
        let Task::Stream(w) = &mut slot.task else {
            // Draining: the rest of an answer already ended.
            return true;
        };
        if let Phase::ErrorBody(status) = w.phase {
            let line = slot.dec.line();
            if line.is_empty() {
                return true;
            }
            let msg = sse::status_message(status, line);
            if !(retryable(status) && self.retry_elsewhere(i, status >= 500, io, sink)) {
                self.fail(i, 502, &msg, status >= 500, io, sink);
            }
            return false;
        }
        let event = match sse::parse_line(slot.dec.line()) {
            Ok(SseLine::Skip) => return true,
            Ok(SseLine::Event(e)) => e,
            Ok(SseLine::Error(msg)) => {
                self.fail(i, 502, &msg, false, io, sink);
                return false;
            }
            Err(e) => {
                self.fail(i, 502, &e, true, io, sink);
                return false;
            }
        };
        let id = w.id;
        // Credit counts tokens: one sink call per token id. An event's text
        // goes with its last token (it is complete only there); text without
        // ids counts as one token.
        let mut content: &str = &event.content;
        if w.echo_skip > 0 && !content.is_empty() {
            content = super::failover::skip_echo(content, &slot.text[..w.folded_bytes], &mut w.echo_skip);
        }
        let count = event.token_count.max(u32::from(!content.is_empty()));
        slot.growing
            .extend(content.as_bytes(), &self.shared[slot.upstream].index);
        if self.cfg.failover && !w.text_over {
            if slot.text.len() + content.len() <= self.cfg.failover_text_bytes_max {
                slot.text.extend_from_slice(content.as_bytes());
            } else {
                w.text_over = true;
            }
        }
        for k in 0..count {
            let text = if k + 1 == count { content.as_bytes() } else { b"" };
            w.delivered += 1;
            match sink.token(id, text) {
                Delivery::Accepted => {}
                // The rest of this event still goes out: the stream's
                // buffer bound leaves room for one event's tokens.
                Delivery::Pause if !event.stop => w.flow = Flow::Paused,
                Delivery::Pause => {}
                Delivery::Gone => {
                    self.by_id.remove(&id);
                    self.stats.cancelled += 1;
                    slot.task = Task::None;
                    self.abort_conn(i, io);
                    self.settle(i);
                    return false;
                }
            }
        }
        if count > 0 {
            slot.deadline = if w.flow == Flow::Paused {
                None
            } else {
                Some(io.now() + self.cfg.idle_token_timeout)
            };
        }
        if event.stop {
            let reason = event.finish_reason();
            self.by_id.remove(&id);
            if let Some(n) = event.prompt_tokens() {
                // A continuation's prompt holds the text generated before
                // the seam, which usage counts as completion tokens.
                sink.prompt_tokens(id, n.saturating_sub(w.folded_tokens));
            }
            sink.end(id, reason);
            slot.task = Task::Drain;
            slot.deadline = Some(io.now() + self.cfg.idle_token_timeout);
            let (upstream, split) = (slot.upstream, event.cache_split());
            self.note_cache(upstream, split);
            tracing::debug!(upstream, ?split, "ended");
            return true;
        }
        w.flow != Flow::Paused
    }

    pub(super) fn on_end(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        let pool = !self.closes_after_stream[self.slots[i].upstream];
        let slot = &mut self.slots[i];
        match &slot.task {
            Task::Stream(w) => {
                let msg = match w.phase {
                    Phase::ErrorBody(status) => sse::status_message(status, b""),
                    _ => "llama-server ended the response without a final event".to_string(),
                };
                // A stream cut short after tokens is a broken server:
                // failed over like a lost connection.
                let cut = w.phase == Phase::Streaming && w.delivered > 0;
                let down = matches!(w.phase, Phase::ErrorBody(s) if s >= 500);
                let retry = cut || matches!(w.phase, Phase::ErrorBody(s) if retryable(s));
                if !(retry && self.retry_elsewhere(i, down, io, sink)) {
                    self.fail(i, 502, &msg, down, io, sink);
                }
            }
            Task::Drain | Task::None | Task::Health | Task::Spare => {
                slot.task = Task::None;
                if pool && slot.keep_alive && slot.recv_pos == slot.recv_len && i < self.stream_slots {
                    // Back to the pool, idle and watched.
                    self.watch(i, io);
                } else {
                    self.abort_conn(i, io);
                }
            }
        }
    }

    /// The decoder wants more bytes.
    pub(super) fn need_more(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &self.slots[i];
        let read = match &slot.task {
            Task::Stream(w) => w.flow != Flow::Paused,
            Task::Drain | Task::Health => true,
            Task::None | Task::Spare => false,
        };
        if read && matches!(slot.conn, Conn::Ready(_)) {
            self.arm_recv(i, io);
        }
    }

    pub(super) fn on_timeout(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.llama.timeouts += 1;
        let slot = &self.slots[i];
        match &slot.task {
            Task::Stream(w) => {
                let (msg, down) = match w.phase {
                    Phase::Connecting => (format!("connect timed out after {:?}", self.cfg.connect_timeout), true),
                    Phase::AwaitHead | Phase::ErrorBody(_) => {
                        (format!("no answer within {:?}", self.cfg.first_token_timeout), false)
                    }
                    Phase::Streaming if w.delivered == 0 => (
                        format!("no first token within {:?}", self.cfg.first_token_timeout),
                        false,
                    ),
                    Phase::Streaming => (
                        format!(
                            "no token for {:?} after {} tokens",
                            self.cfg.idle_token_timeout, w.delivered
                        ),
                        false,
                    ),
                };
                self.fail(i, 504, &format!("llama-server timed out: {msg}"), down, io, sink);
            }
            Task::Health | Task::Drain | Task::None | Task::Spare => self.abandon_conn(i, io),
        }
    }

    pub(super) fn on_eof(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        let slot = &mut self.slots[i];
        match slot.dec.eof() {
            Ok(Item::Line) => {
                // A final unterminated line of a read-until-close body.
                if self.on_line(i, io, sink) {
                    self.on_eof_end(i, io, sink);
                }
            }
            Ok(_) => self.on_eof_end(i, io, sink),
            Err(_) => {
                let what = "connection closed by llama-server".to_string();
                self.conn_failed(i, what, true, io, sink);
            }
        }
    }

    pub(super) fn on_eof_end(&mut self, i: usize, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.slots[i].keep_alive = false;
        self.on_end(i, io, sink);
    }
}
