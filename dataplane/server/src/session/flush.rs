//! Frames back: for every connection touched this turn, each stream's
//! queued tokens become one TOKENS frame within its credit (credit counts
//! tokens), then END or ERROR; a paused backend resumes once its queue
//! drains to half; one send per connection per turn, from the filling half
//! of the double-buffered output (the kernel owns the other).

use std::time::Instant;

use cnse_proto::{put_end, put_error, put_tokens};

use super::{work_id, Session};
use crate::conn::{ConnState, SendOp};
use crate::stream::{Phase, Stream};
use crate::transport::Transport;

/// Room kept free in a send buffer for the small frames (ERROR, END) a
/// frame's handling may append.
pub(super) const REPLY_SLACK_BYTES: usize = 512;

/// (time to first token, total) of a stream at `now_us`, in microseconds.
pub(super) fn times(s: &Stream, now_us: u64) -> (u64, u64) {
    let ttft = s.first_us.map_or(0, |f| f.saturating_sub(s.arrived_us));
    (ttft, now_us.saturating_sub(s.arrived_us))
}

/// Accounts for a TOKENS frame of `n` tokens of stream `s` just appended
/// to its connection's filling send (by the flush from the stream's
/// queue, or by the sink straight from the backend): the send's frame
/// count (`fill_frames`), the stream's index and credit, its timings and
/// the counters.
pub(super) fn tokens_framed(
    s: &mut Stream,
    fill_frames: &mut u32,
    n: u32,
    now_us: u64,
    metrics: &mut crate::metrics::RequestMetrics,
    counters: &mut super::tables::Counters,
) {
    *fill_frames += 1;
    s.sent += u64::from(n);
    s.credit.spend(u64::from(n));
    framed(s, now_us, metrics);
    counters.tokens_sent += u64::from(n);
    counters.frames_out += 1;
}

/// Notes that tokens of `s` were framed at `now_us`: time to first token
/// or the gap since its last frame.
pub(crate) fn framed(s: &mut Stream, now_us: u64, metrics: &mut crate::metrics::RequestMetrics) {
    match s.first_us {
        None => {
            s.first_us = Some(now_us);
            metrics.ttft.record_us(now_us.saturating_sub(s.arrived_us));
        }
        Some(_) => metrics.inter_token.record_us(now_us.saturating_sub(s.last_us)),
    }
    s.last_us = now_us;
}

impl<T: Transport> Session<T> {
    pub(super) fn flush_dirty(&mut self) {
        let mut i = 0;
        while i < self.tables.dirty.len() {
            let slot = self.tables.dirty[i];
            i += 1;
            self.tables.conns[slot as usize].dirty = false;
            self.flush_conn(slot);
        }
        self.tables.dirty.clear();
    }

    pub(super) fn flush_conn(&mut self, slot: u32) {
        let c = &self.tables.conns[slot as usize];
        let idle = c.send == SendOp::Idle;
        match c.state {
            ConnState::Open => {}
            ConnState::Draining { .. } => {
                if idle {
                    if c.out_fill.is_empty() && c.flight_sent >= c.out_flight.len() {
                        self.close_conn(slot);
                    } else {
                        self.submit_send(slot);
                    }
                }
                return;
            }
            ConnState::Handshake => {
                if idle {
                    self.submit_send(slot);
                }
                return;
            }
            ConnState::Free | ConnState::Closing => return,
        }
        let http = self.tables.conns[slot as usize].proto == crate::conn::Proto::Http;
        loop {
            let out_seq = self.tables.conns[slot as usize].http.out_seq;
            let mut k = 0;
            while k < self.tables.conns[slot as usize].streams.len() {
                let more = if http {
                    self.http_flush_stream(slot, k)
                } else {
                    self.flush_stream(slot, k)
                };
                if more {
                    k += 1;
                }
            }
            // HTTP: a response ended, so the next in order may write now.
            if !http || self.tables.conns[slot as usize].http.out_seq == out_seq {
                break;
            }
        }
        if http {
            // Answer what waited for the responses in flight.
            self.http_drive(slot);
        }
        if self.tables.conns[slot as usize].send == SendOp::Idle {
            self.submit_send(slot);
        }
        self.tables.account_conn(slot);
    }

    /// Frames stream `k` of connection `slot`; false when it ended (and was
    /// removed from the connection's list).
    fn flush_stream(&mut self, slot: u32, k: usize) -> bool {
        let t = &mut self.tables;
        let now_us = t.now_us;
        let soft = t.cfg.send_buffer_bytes;
        let (client_id, sslot) = t.conns[slot as usize].streams[k];
        let cap = t.cfg.frames_per_send_max;
        if cap != 0 && t.conns[slot as usize].fill_frames as usize >= cap {
            // This send is full: the stream's frames wait for the next
            // (the send's completion marks the connection dirty again).
            return true;
        }
        let (streams, conns) = (&mut t.streams, &mut t.conns);
        let s = &mut streams[sslot as usize];
        let c = &mut conns[slot as usize];
        let out = &mut c.out_fill;
        if s.phase != Phase::Failed && s.queue.tokens() > 0 && s.credit.available() > 0 {
            let room = soft.saturating_sub(out.len() + REPLY_SLACK_BYTES);
            if room > 0 || out.is_empty() {
                let (n, text) = s.queue.take(s.credit.available(), room);
                put_tokens(out, client_id, n, s.sent, text);
                tokens_framed(s, &mut c.fill_frames, n, now_us, &mut t.metrics, &mut t.n);
            }
        }
        let full = cap != 0 && c.fill_frames as usize >= cap;
        let done = match s.phase {
            // With the send full, END or ERROR goes in the next.
            _ if full => false,
            Phase::Finished(reason) if s.queue.tokens() == 0 => {
                let (ttft, total) = times(s, now_us);
                let at = out.len();
                put_end(out, client_id, reason, s.sent, ttft, total);
                if s.failed_over && c.features & cnse_proto::FEATURE_FAILOVER_MARK != 0 {
                    cnse_proto::set_flags(out, at, cnse_proto::END_FLAG_FAILED_OVER);
                }
                c.fill_frames += 1;
                t.metrics.e2e.record_us(total);
                t.metrics.outcome(false, crate::metrics::Outcome::Ok);
                if let Some(st) = &mut t.stages {
                    let c = &mut conns[slot as usize];
                    let framed = Instant::now();
                    let produced = s.produced.unwrap_or(s.parsed);
                    st.recv_parse.record(s.parsed.saturating_duration_since(s.arrived));
                    st.parse_backend.record(produced.saturating_duration_since(s.parsed));
                    st.backend_end.record(framed.saturating_duration_since(produced));
                    c.fill_first_end.get_or_insert(framed);
                    c.fill_ends += 1;
                }
                true
            }
            Phase::Failed => {
                put_error(out, client_id, s.error_code, &s.error_message);
                c.fill_frames += 1;
                t.metrics.outcome(false, crate::metrics::Outcome::Error);
                t.metrics.error(s.error_code);
                true
            }
            _ => false,
        };
        if done {
            t.n.frames_out += 1;
            t.conns[slot as usize].streams.swap_remove(k);
            t.free_stream(sslot);
            return false;
        }
        self.resume_if_drained(sslot);
        true
    }

    /// A paused backend resumes once its stream's queue drained to half.
    pub(crate) fn resume_if_drained(&mut self, sslot: u32) {
        let cfg = &self.tables.cfg;
        let (low_tokens, low_bytes) = (cfg.stream_buffered_tokens_max / 2, cfg.stream_buffered_bytes_max / 2);
        if self.tables.streams[sslot as usize].remote.is_some() {
            return self.grant_remote(sslot);
        }
        let s = &mut self.tables.streams[sslot as usize];
        if s.paused && s.phase == Phase::Running && s.queue.tokens() <= low_tokens && s.queue.bytes() <= low_bytes {
            s.paused = false;
            let id = work_id(sslot, s.gen);
            self.backend.resume(id, &mut self.io);
        }
    }

    /// Hands the connection's pending output to the transport: the rest of
    /// the in-flight half, else the filled half (swapped in).
    pub(super) fn submit_send(&mut self, slot: u32) {
        let c = &mut self.tables.conns[slot as usize];
        debug_assert_eq!(c.send, SendOp::Idle);
        if c.flight_sent >= c.out_flight.len() {
            if c.out_fill.is_empty() {
                return;
            }
            std::mem::swap(&mut c.out_fill, &mut c.out_flight);
            c.flight_sent = 0;
            c.fill_frames = 0;
            if let (Some(first), Some(st)) = (c.fill_first_end.take(), &mut self.tables.stages) {
                if st.pending.len() == st.pending.capacity() {
                    // An I/O layer that never reports its submits (the
                    // simulator): keep the list bounded.
                    st.submitted(Instant::now());
                }
                st.pending.push((first, c.fill_ends));
            }
            c.fill_ends = 0;
        }
        c.send = SendOp::InFlight;
        let r = c.conn_ref(slot);
        // SAFETY: out_flight is not touched while the send is in flight
        // (SendOp::InFlight until `on_send_done`), and the connection slot
        // is not released before it completes.
        unsafe { self.io.send(r, &c.out_flight[c.flight_sent..]) };
    }
}
