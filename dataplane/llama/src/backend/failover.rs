//! Retries (issue 14): a stream that fails before its first token on a
//! server that refused it (connection refused or lost, HTTP 5xx, 429) is
//! sent again to another healthy server, within `LlamaConfig::retries_max`,
//! invisibly to the client: no token has gone out, so the client sees one
//! ordinary stream. Each server is tried once per stream.

use std::sync::atomic::Ordering;

use cnse_backend::{Io, Sink};

use super::{LlamaBackend, Phase, Task};

impl LlamaBackend {
    /// Moves the stream of connection slot `i` to another server when it
    /// may be retried. Returns true when the stream was taken care of
    /// (sent elsewhere, or failed there at once with its ERROR given);
    /// false when the caller ends it as a failure. `down`: slot `i`'s
    /// server is broken and is evicted.
    pub(super) fn retry_elsewhere(&mut self, i: usize, down: bool, io: &mut dyn Io, sink: &mut dyn Sink) -> bool {
        let from = self.slots[i].upstream;
        let Task::Stream(w) = &self.slots[i].task else {
            return false;
        };
        if w.delivered > 0 || w.retries >= self.cfg.retries_max {
            return false;
        }
        let tried = w.tried | 1u64 << from;
        let completion = w.completion;
        let Some(u) = self.reserve_untried(tried) else {
            return false;
        };
        let Some((j, pick)) = self.pick_slot(u) else {
            self.shared[u].inflight.fetch_sub(1, Ordering::AcqRel);
            return false;
        };
        if !self.body_without_slot(i) {
            self.shared[u].inflight.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        let id_slot = self.take_slot(u, None);
        if let Some(id) = id_slot {
            crate::body::append_id_slot(&mut self.body_scratch, id);
        }
        let Task::Stream(mut w) = std::mem::replace(&mut self.slots[i].task, Task::None) else {
            unreachable!("checked above: slot {i} holds a stream")
        };
        self.by_id.remove(&w.id);
        if down {
            self.mark_down(from);
        }
        self.abort_conn(i, io);
        self.settle(i);
        w.retries += 1;
        w.tried = tried;
        w.phase = Phase::AwaitHead;
        let id = w.id;
        let slot = &mut self.slots[j];
        slot.reserved = true;
        slot.id_slot = id_slot;
        slot.growing = crate::prefix::Growing::default();
        self.llama.retried_elsewhere += 1;
        tracing::debug!(
            from,
            to = u,
            "stream sent again to another llama-server before its first token"
        );
        let path = if completion {
            "/completion"
        } else {
            "/v1/chat/completions"
        };
        if let Err(e) = self.launch(j, pick, path, w, io) {
            self.stats.failed += 1;
            sink.error(id, 502, &format!("llama backend: socket: {e}"));
        }
        true
    }

    /// Reserves a place on the healthy server not in `tried` with the
    /// fewest requests in flight.
    fn reserve_untried(&mut self, tried: u64) -> Option<usize> {
        let limit = self.cfg.inflight_per_backend;
        for _ in 0..4 {
            let u = (0..self.shared.len())
                .filter(|&u| tried & (1u64 << u) == 0 && self.shared[u].healthy.load(Ordering::Acquire))
                .map(|u| (u, self.shared[u].inflight.load(Ordering::Acquire)))
                .filter(|&(_, n)| n < limit)
                .min_by_key(|&(_, n)| n)?
                .0;
            if self.reserve(u) {
                return Some(u);
            }
        }
        None
    }

    /// The body of the request slot `i` sent, into `body_scratch`, without
    /// its `id_slot` (it names a slot of the old server). False when the
    /// send buffer does not hold a whole request.
    fn body_without_slot(&mut self, i: usize) -> bool {
        let send = &self.slots[i].send;
        let Some(at) = send.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let body = &send[at + 4..];
        self.body_scratch.clear();
        self.body_scratch.extend_from_slice(body);
        // `append_id_slot` put it last: `,"id_slot":N}`.
        const KEY: &[u8] = b",\"id_slot\":";
        if let Some(k) = self.body_scratch.windows(KEY.len()).rposition(|w| w == KEY) {
            let tail = &self.body_scratch[k + KEY.len()..];
            if tail.len() >= 2 && tail[..tail.len() - 1].iter().all(u8::is_ascii_digit) && tail.ends_with(b"}") {
                self.body_scratch.truncate(k);
                self.body_scratch.push(b'}');
            }
        }
        !self.body_scratch.is_empty()
    }
}
