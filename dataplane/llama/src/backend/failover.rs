//! Retries and failover (issue 14).
//!
//! Retry: a stream that fails before its first token on a server that
//! refused it (connection refused or lost, HTTP 5xx, 429) is sent again to
//! another healthy server, invisibly to the client: no token has gone out,
//! so the client sees one ordinary stream.
//!
//! Failover (`LlamaConfig::failover`): a stream whose server fails after
//! tokens were delivered (connection lost or reset, a broken reply, a
//! response cut short) continues on another healthy server: the request is
//! sent again with the text generated so far folded in (`/completion`: the
//! prompt and the text; chat: the text as an assistant message, which
//! llama-server continues, "assistant prefill"), the same sampling fields,
//! and `max_tokens` less the tokens delivered. The sink hears
//! `failed_over` at the seam; token indices simply go on.
//!
//! Both move a stream at most `LlamaConfig::retries_max` times, and each
//! server is tried once per stream.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cnse_backend::{FinishReason, Io, Sink};

use super::{LlamaBackend, Phase, Task};

/// What is left of `content` once the part of the assistant prefill
/// (`prefill`'s last `*skip` bytes) that llama-server echoes at its start
/// is cut off. A server that does not echo (the content does not start
/// with the prefill) stops the skipping: its text is all new.
pub(super) fn skip_echo<'a>(content: &'a str, prefill: &[u8], skip: &mut usize) -> &'a str {
    let want = &prefill[prefill.len() - *skip..];
    let k = want.len().min(content.len());
    if content.as_bytes()[..k] == want[..k] && content.is_char_boundary(k) {
        *skip -= k;
        &content[k..]
    } else {
        *skip = 0;
        content
    }
}

/// Failover warnings logged per second at most (the rest are counted and
/// named in the next line).
const LOG_BURST: u32 = 10;

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
        let after_tokens = w.delivered > 0;
        if after_tokens && (!self.cfg.failover || w.text_over) {
            return false;
        }
        if after_tokens && w.delivered >= u64::from(w.max_tokens) {
            // Every token came; only the final event was lost.
            self.finish_at_limit(i, down, io, sink);
            return true;
        }
        if w.retries >= self.cfg.retries_max {
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
        let body = if after_tokens {
            self.continuation_body(i)
        } else {
            self.body_without_slot(i)
        };
        if !body {
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
        // The text so far moves with the stream; slot `i` keeps slot `j`'s
        // (empty) buffer, so no allocation.
        let text = std::mem::take(&mut self.slots[i].text);
        let mut spare = std::mem::replace(&mut self.slots[j].text, text);
        spare.clear();
        self.slots[i].text = spare;
        w.folded_bytes = self.slots[j].text.len();
        w.folded_tokens = w.delivered;
        // llama-server answers an assistant prefill with the prefill
        // itself first (b11434: the first chunk is the prefill and the
        // first new token): that much is not sent to the client again.
        w.echo_skip = if completion { 0 } else { w.folded_bytes };
        let (id, delivered) = (w.id, w.delivered);
        let slot = &mut self.slots[j];
        slot.reserved = true;
        slot.id_slot = id_slot;
        slot.growing = crate::prefix::Growing::default();
        if after_tokens {
            self.llama.failed_over += 1;
            self.warn_failover(io.now(), from, u, delivered);
        } else {
            self.llama.retried_elsewhere += 1;
            tracing::debug!(
                from,
                to = u,
                "stream sent again to another llama-server before its first token"
            );
        }
        let path = if completion {
            "/completion"
        } else {
            "/v1/chat/completions"
        };
        if let Err(e) = self.launch(j, pick, path, w, io) {
            self.stats.failed += 1;
            sink.error(id, 502, &format!("llama backend: socket: {e}"));
        } else if after_tokens {
            sink.failed_over(id);
        }
        true
    }

    /// A stream whose every token was delivered lost its server before the
    /// final event: it ends as llama-server would have ended it (length).
    fn finish_at_limit(&mut self, i: usize, down: bool, io: &mut dyn Io, sink: &mut dyn Sink) {
        let Task::Stream(w) = std::mem::replace(&mut self.slots[i].task, Task::None) else {
            unreachable!("the caller checked: slot {i} holds a stream")
        };
        self.by_id.remove(&w.id);
        sink.end(w.id, FinishReason::Length);
        if down {
            self.mark_down(self.slots[i].upstream);
        }
        self.abort_conn(i, io);
        self.settle(i);
    }

    /// One warn line per failover, `LOG_BURST` a second at most.
    fn warn_failover(&mut self, now: Instant, from: usize, to: usize, delivered: u64) {
        if self
            .log_window
            .is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1))
        {
            self.log_window = Some(now);
            self.log_count = 0;
        }
        if self.log_count >= LOG_BURST {
            self.log_suppressed += 1;
            return;
        }
        self.log_count += 1;
        let suppressed = std::mem::take(&mut self.log_suppressed);
        tracing::warn!(
            from = %self.shared[from].target.url,
            to = %self.shared[to].target.url,
            delivered,
            suppressed,
            "llama-server failed mid-stream: the stream continues on another server"
        );
    }

    /// The continuation of slot `i`'s stream into `body_scratch`: its last
    /// request body with the text generated since that body was written
    /// folded in, `max_tokens` less the tokens delivered, and no `id_slot`.
    /// False when the body cannot be rebuilt (then no failover).
    fn continuation_body(&mut self, i: usize) -> bool {
        let slot = &self.slots[i];
        let Task::Stream(w) = &slot.task else { return false };
        let Some(at) = slot.send.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let Ok(mut body) = serde_json::from_slice::<serde_json::Value>(&slot.send[at + 4..]) else {
            return false;
        };
        let Some(obj) = body.as_object_mut() else { return false };
        // Each event's text is a whole JSON string, so the text is UTF-8
        // at every event boundary, `folded_bytes` included.
        let Some(new) = slot
            .text
            .get(w.folded_bytes..)
            .and_then(|t| std::str::from_utf8(t).ok())
        else {
            return false;
        };
        let left = u64::from(w.max_tokens).saturating_sub(w.delivered);
        obj.remove("id_slot");
        if w.completion {
            let Some(serde_json::Value::String(prompt)) = obj.get_mut("prompt") else {
                return false;
            };
            prompt.push_str(new);
            obj.insert("n_predict".into(), left.into());
        } else {
            let Some(serde_json::Value::Array(messages)) = obj.get_mut("messages") else {
                return false;
            };
            if w.folded_bytes > 0 {
                // Failed over before: the assistant prefill is last.
                let Some(serde_json::Value::String(c)) = messages.last_mut().and_then(|m| m.get_mut("content")) else {
                    return false;
                };
                c.push_str(new);
            } else {
                messages.push(serde_json::json!({ "role": "assistant", "content": new }));
            }
            obj.insert("max_tokens".into(), left.into());
        }
        self.body_scratch.clear();
        serde_json::to_writer(&mut self.body_scratch, &body).is_ok()
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

#[cfg(test)]
mod tests {
    use super::skip_echo;

    #[test]
    fn issue14_the_echoed_prefill_is_cut_once_and_new_text_kept() {
        // b11434: the first chunk is the prefill and the first new token.
        let mut skip = 15;
        assert_eq!(skip_echo("One, two, three,", b"One, two, three", &mut skip), ",");
        assert_eq!(skip, 0);
        // The echo split over two chunks.
        let mut skip = 15;
        assert_eq!(skip_echo("One, two", b"One, two, three", &mut skip), "");
        assert_eq!(skip_echo(", three four", b"One, two, three", &mut skip), " four");
        assert_eq!(skip, 0);
        // A server that does not echo: its text is all new, and the
        // skipping stops.
        let mut skip = 15;
        assert_eq!(skip_echo(" four", b"One, two, three", &mut skip), " four");
        assert_eq!(skip, 0);
        // Only the last `skip` bytes of the prefill are still due.
        let mut skip = 5;
        assert_eq!(skip_echo("three!", b"One, two, three", &mut skip), "!");
    }
}
