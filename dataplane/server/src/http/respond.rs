//! HTTP responses: status lines and headers, server-sent events in chunked
//! transfer coding, and the flush of an HTTP stream (the HTTP counterpart
//! of `session/flush.rs`'s TOKENS/END framing).

use cnse_backend::FinishReason;

use super::openai::{self, Ident};
use crate::session::Session;
use crate::stream::{Phase, Stream};
use crate::transport::Transport;

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// Status line and headers; `len` None means chunked (a stream).
pub fn head(out: &mut Vec<u8>, status: u16, content_type: &str, len: Option<usize>, keep_alive: bool) {
    out.extend_from_slice(b"HTTP/1.1 ");
    openai::push_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\n");
    match len {
        Some(n) => {
            out.extend_from_slice(b"Content-Length: ");
            openai::push_u64(out, n as u64);
            out.extend_from_slice(b"\r\n");
        }
        None => out.extend_from_slice(b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n"),
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// One server-sent event (`data: ...\n\n`) as one chunk; the event is
/// written by `f` into `scratch` first (its length leads the chunk).
fn event(out: &mut Vec<u8>, scratch: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) {
    scratch.clear();
    scratch.extend_from_slice(b"data: ");
    f(scratch);
    scratch.extend_from_slice(b"\n\n");
    push_hex(out, scratch.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(scratch);
    out.extend_from_slice(b"\r\n");
}

/// A chunk's size line: `n` in lower-case hexadecimal.
fn push_hex(out: &mut Vec<u8>, n: usize) {
    let digits = (usize::BITS - n.leading_zeros()).div_ceil(4).max(1);
    for k in (0..digits).rev() {
        out.push(b"0123456789abcdef"[(n >> (4 * k)) & 0xf]);
    }
}

/// Where a stop sequence starts in `text` (searching only where it could
/// not have been seen before: from `from` less the longest stop).
fn find_stop(text: &[u8], from: usize, stops: &[String]) -> Option<usize> {
    let longest = stops.iter().map(String::len).max().unwrap_or(0);
    let start = from.saturating_sub(longest.saturating_sub(1));
    stops
        .iter()
        .filter_map(|s| {
            text[start..]
                .windows(s.len())
                .position(|w| w == s.as_bytes())
                .map(|p| start + p)
        })
        .min()
}

/// Bytes of `h.text` that may go out now: not a possible start of a stop
/// sequence, not inside a UTF-8 character.
fn ready(s: &Stream, finished: bool) -> usize {
    let h = &s.http;
    let hold = if finished {
        0
    } else {
        h.stops.iter().map(String::len).max().unwrap_or(1) - 1
    };
    let n = h.text.len().saturating_sub(hold);
    openai::utf8_prefix(&h.text[..n])
}

impl<T: Transport> Session<T> {
    /// Frames stream `k` of HTTP connection `slot`; false when it ended.
    pub(crate) fn http_flush_stream(&mut self, slot: u32, k: usize) -> bool {
        let soft = self.tables.cfg.send_buffer_bytes;
        let (_, sslot) = self.tables.conns[slot as usize].streams[k];
        let now_us = self.tables.now_us;
        {
            // Responses go out in request order: a later one waits (its
            // tokens stay queued, and the queue bound pauses its backend).
            let t = &mut self.tables;
            let (s, c) = (&mut t.streams[sslot as usize], &mut t.conns[slot as usize]);
            if s.http.seq != c.http.out_seq {
                return true;
            }
            if s.http.sse && !s.http.head_sent {
                let last = c.http.close_after && s.http.seq + 1 == c.http.next_seq;
                head(&mut c.out_fill, 200, "text/event-stream", None, !last);
                s.http.head_sent = true;
            }
        }
        // Tokens while the connection's output has room (a slow reader
        // leaves them queued, and the queue bound pauses the backend).
        {
            let t = &mut self.tables;
            let (s, c) = (&mut t.streams[sslot as usize], &t.conns[slot as usize]);
            let room = soft.saturating_sub(c.out_fill.len());
            if s.phase != Phase::Failed
                && s.queue.tokens() > 0
                && (room > 0 || c.out_fill.is_empty())
                && !s.http.stopped
            {
                let seen = s.http.text.len();
                let (n, text) = s.queue.take(u64::MAX, room.max(1));
                s.http.text.extend_from_slice(text);
                s.sent += u64::from(n);
                t.n.tokens_sent += u64::from(n);
                crate::session::flush::framed(s, now_us, &mut t.metrics);
                if let Some(at) = find_stop(&s.http.text, seen, &s.http.stops) {
                    s.http.text.truncate(at);
                    s.http.stopped = true;
                }
            }
        }
        let s = &self.tables.streams[sslot as usize];
        if s.http.stopped && s.phase == Phase::Running {
            // The backend's work ends here; what it queued meanwhile is dropped.
            self.stop_stream(sslot);
            let s = &mut self.tables.streams[sslot as usize];
            s.phase = Phase::Finished(FinishReason::Stop);
            s.queue.clear();
        }
        let s = &self.tables.streams[sslot as usize];
        let finished = matches!(s.phase, Phase::Finished(_)) && s.queue.tokens() == 0;
        let failed = s.phase == Phase::Failed;
        if s.http.sse && !failed && !finished {
            self.http_emit(slot, sslot, false);
        }
        if !(finished || failed) {
            self.resume_if_drained(sslot);
            return true;
        }
        let t = &mut self.tables;
        let s = &t.streams[sslot as usize];
        if failed {
            t.metrics.outcome(true, crate::metrics::Outcome::Error);
            t.metrics.error(s.error_code);
            self.http_fail_stream(slot, sslot);
        } else {
            t.metrics.e2e.record_us(now_us.saturating_sub(s.arrived_us));
            t.metrics.outcome(true, crate::metrics::Outcome::Ok);
            self.http_finish_stream(slot, sslot);
        }
        let t = &mut self.tables;
        t.n.frames_out += 1;
        t.conns[slot as usize].streams.swap_remove(k);
        t.free_stream(sslot);
        let c = &mut t.conns[slot as usize];
        c.http.active -= 1;
        c.http.out_seq += 1;
        if c.http.close_after && c.http.active == 0 {
            self.http_close_after_output(slot);
        }
        false
    }

    /// Writes the text that may go out as SSE chunks.
    fn http_emit(&mut self, slot: u32, sslot: u32, finished: bool) {
        let cfg = self.tables.cfg.clone();
        let model = &cfg.model_name;
        let t = &mut self.tables;
        let (s, c) = (&mut t.streams[sslot as usize], &mut t.conns[slot as usize]);
        let n = ready(s, finished);
        let h = &mut s.http;
        let i = Ident {
            kind: h.kind,
            id: h.id,
            created: h.created,
            model,
        };
        if n > 0 || (!h.first_sent && h.kind == openai::Kind::Chat) {
            let first = !h.first_sent;
            event(&mut c.out_fill, &mut t.http_scratch, |o| {
                openai::chunk(o, &i, &h.text[..n], first, None)
            });
            h.first_sent = true;
            h.text.drain(..n);
        }
    }

    fn http_finish_stream(&mut self, slot: u32, sslot: u32) {
        let cfg = self.tables.cfg.clone();
        let model = &cfg.model_name;
        let t = &mut self.tables;
        let (s, c) = (&mut t.streams[sslot as usize], &mut t.conns[slot as usize]);
        let finish = match s.phase {
            _ if s.http.stopped => "stop",
            Phase::Finished(FinishReason::Stop) => "stop",
            _ => "length",
        };
        let h = &s.http;
        let i = Ident {
            kind: h.kind,
            id: h.id,
            created: h.created,
            model,
        };
        if h.sse {
            let scratch = &mut t.http_scratch;
            // The rest of the text goes with the finish reason: one event.
            let first = !h.first_sent;
            event(&mut c.out_fill, scratch, |o| {
                openai::chunk(o, &i, &h.text, first, Some(finish))
            });
            if h.include_usage {
                event(&mut c.out_fill, scratch, |o| {
                    openai::usage_chunk(o, &i, h.prompt_tokens, s.sent)
                });
            }
            event(&mut c.out_fill, scratch, |o| o.extend_from_slice(b"[DONE]"));
            c.out_fill.extend_from_slice(b"0\r\n\r\n");
        } else {
            let scratch = &mut t.http_scratch;
            scratch.clear();
            openai::full(scratch, &i, &h.text, finish, h.prompt_tokens, s.sent);
            let last = c.http.close_after && h.seq + 1 == c.http.next_seq;
            head(&mut c.out_fill, 200, "application/json", Some(scratch.len()), !last);
            c.out_fill.extend_from_slice(scratch);
        }
    }

    /// The stream failed (backend error, stall timeout, shutdown): an error
    /// response, or inside an event stream an error event and its end.
    fn http_fail_stream(&mut self, slot: u32, sslot: u32) {
        let t = &mut self.tables;
        let (s, c) = (&t.streams[sslot as usize], &mut t.conns[slot as usize]);
        let status = super::status_of(s.error_code);
        let scratch = &mut t.http_scratch;
        if s.http.sse {
            event(&mut c.out_fill, scratch, |o| {
                openai::error_body(o, status, &s.error_message)
            });
            event(&mut c.out_fill, scratch, |o| o.extend_from_slice(b"[DONE]"));
            c.out_fill.extend_from_slice(b"0\r\n\r\n");
        } else {
            scratch.clear();
            openai::error_body(scratch, status, &s.error_message);
            let last = c.http.close_after && s.http.seq + 1 == c.http.next_seq;
            head(&mut c.out_fill, status, "application/json", Some(scratch.len()), !last);
            c.out_fill.extend_from_slice(scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_are_found_across_token_boundaries_once() {
        let stops = vec!["END".to_string(), "xy".to_string()];
        assert_eq!(find_stop(b"abcEN", 3, &stops), None);
        assert_eq!(find_stop(b"abcEND", 5, &stops), Some(3));
        assert_eq!(find_stop(b"axyEND", 1, &stops), Some(1));
    }

    #[test]
    fn events_are_chunks() {
        let (mut out, mut scratch) = (Vec::new(), Vec::new());
        event(&mut out, &mut scratch, |o| o.extend_from_slice(b"[DONE]"));
        assert_eq!(out, b"e\r\ndata: [DONE]\n\n\r\n");
        for n in [0usize, 9, 15, 16, 255, 0x1234, usize::MAX] {
            let mut o = Vec::new();
            push_hex(&mut o, n);
            assert_eq!(String::from_utf8(o).unwrap(), format!("{n:x}"));
        }
        let mut o = Vec::new();
        head(&mut o, 429, "application/json", Some(12), false);
        assert_eq!(
            o,
            b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
        );
    }
}
