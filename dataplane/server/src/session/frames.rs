//! Frames in: the decoder runs over received bytes in place, and each
//! frame is handled by kind: HELLO (handshake and key), REQUEST (checks,
//! then scheduling), CANCEL, CREDIT, PING. A protocol violation answers
//! ERROR on stream 0 and drains the connection.

use cnse_backend::FinishReason;
use cnse_proto::{
    code, put_end, put_error, put_hello_ack_features, put_pong, Direction, FrameDecoder, Kind, Request,
    FEATURES_DEFINED,
};

use super::{Session, DRAIN_TIMEOUT};
use crate::conn::ConnState;
use crate::stream::Credit;
use crate::transport::Transport;

/// Staging any frame may use whatever the memory budget says, so small
/// frames split across receives always go through (at most this much per
/// connection beyond the budget).
const STAGING_FLOOR_BYTES: usize = 4 * 1024;

/// A REQUEST that passed its checks, ready to be scheduled.
pub(crate) struct Admitted<'a> {
    pub stream_id: u64,
    pub credit: Credit,
    pub req: Request<'a>,
    /// The HTTP front's chat messages (JSON array), see `Job::chat`.
    pub chat: Option<&'a str>,
    /// The session key (REQUEST flag or `X-Session-Id`), see `Job::session`.
    pub session: Option<&'a str>,
}

/// The header fields a frame's handler reads.
#[derive(Clone, Copy)]
struct Fields {
    flags: u16,
    stream_id: u64,
    arg: u32,
    aux: u64,
}

impl<T: Transport> Session<T> {
    /// Handles the whole frames in `data` while the connection's output has
    /// room; returns the bytes consumed (all of them unless output backed
    /// up).
    pub(super) fn consume(&mut self, slot: u32, data: &[u8]) -> usize {
        let mut input = data;
        let soft_limit = self.tables.cfg.send_buffer_bytes;
        let mut decoder = std::mem::replace(
            &mut self.tables.conns[slot as usize].decoder,
            FrameDecoder::new(Direction::ToServer, 0),
        );
        loop {
            let c = &self.tables.conns[slot as usize];
            if !c.reads_input() {
                input = &[];
                break;
            }
            if input.is_empty() || c.out_fill.len() > soft_limit {
                break;
            }
            // A frame split across receives stages its payload: only what
            // the memory budget has left.
            decoder.set_staging_limit(self.tables.mem_left().max(STAGING_FLOOR_BYTES));
            match decoder.next(&mut input) {
                Ok(Some(frame)) if frame.skipped => {
                    let (kind, stream_id) = (frame.kind, frame.header.stream_id());
                    self.skipped_frame(slot, kind, stream_id);
                }
                Ok(Some(frame)) => {
                    let h = frame.header;
                    let (stream_id, arg, aux) = (h.stream_id(), h.arg(), h.aux());
                    let fields = Fields {
                        flags: h.flags(),
                        stream_id,
                        arg,
                        aux,
                    };
                    self.handle_frame(slot, frame.kind, fields, frame.payload);
                }
                Ok(None) => break,
                Err(v) => {
                    self.violate(slot, v.code, v.message);
                    input = &[];
                    break;
                }
            }
        }
        self.tables.conns[slot as usize].decoder = decoder;
        self.tables.account_conn(slot);
        self.tables.mark_dirty(slot);
        data.len() - input.len()
    }

    /// A frame whose payload the memory budget could not stage (it was
    /// discarded as it arrived): answered without it.
    fn skipped_frame(&mut self, slot: u32, kind: Kind, stream_id: u64) {
        self.tables.n.frames_in += 1;
        let state = self.tables.conns[slot as usize].state;
        match (state, kind) {
            (ConnState::Handshake, _) => {
                self.violate(slot, code::SHUTTING_DOWN, "server memory budget exhausted, retry later")
            }
            (_, Kind::Request) if stream_id == 0 => self.violate(slot, code::BAD_REQUEST, "REQUEST on stream 0"),
            (_, Kind::Request) if self.tables.conns[slot as usize].find_stream(stream_id).is_some() => {
                self.reject(slot, stream_id, code::STREAM_IN_USE, "stream id already in use")
            }
            (_, Kind::Request) => self.reject(
                slot,
                stream_id,
                code::OVERLOADED,
                "memory budget exhausted, retry later",
            ),
            // A large PING while memory is short: no stream to answer on.
            _ => self.violate(slot, code::SHUTTING_DOWN, "server memory budget exhausted, retry later"),
        }
    }

    fn handle_frame(&mut self, slot: u32, kind: Kind, f: Fields, payload: &[u8]) {
        let Fields {
            flags,
            stream_id,
            arg,
            aux,
        } = f;
        self.tables.n.frames_in += 1;
        let state = self.tables.conns[slot as usize].state;
        match (state, kind) {
            (ConnState::Handshake, Kind::Hello) => self.hello(slot, arg, payload),
            (ConnState::Handshake, _) => self.violate(slot, code::BAD_REQUEST, "HELLO must be the first frame"),
            (_, Kind::Hello) => self.violate(slot, code::BAD_REQUEST, "second HELLO"),
            (_, Kind::Ping) => {
                let c = &mut self.tables.conns[slot as usize];
                put_pong(&mut c.out_fill, stream_id, arg, aux, payload);
                self.tables.n.frames_out += 1;
            }
            (_, Kind::Request) => self.request(slot, stream_id, arg, flags, payload),
            (_, Kind::Cancel) => self.cancel(slot, stream_id),
            (_, Kind::Credit) => {
                let Some(i) = self.tables.conns[slot as usize].find_stream(stream_id) else {
                    return;
                };
                let sslot = self.tables.conns[slot as usize].streams[i].1;
                self.tables.streams[sslot as usize].credit.grant(arg);
                self.tables.mark_dirty(slot);
            }
            (_, Kind::HelloAck | Kind::Tokens | Kind::End | Kind::Error | Kind::Pong) => {
                unreachable!("the decoder rejects server kinds from clients")
            }
        }
    }

    /// Handshake: the key (when one is configured), then HELLO_ACK. The
    /// features granted are those asked for in `wanted` that this server
    /// defines (docs/PROTOCOL.md, "Protocol features"): bits it does not
    /// know are not granted, as the contract has receivers ignore them.
    fn hello(&mut self, slot: u32, wanted: u32, payload: &[u8]) {
        let authorized = match &self.auth {
            Some(key) => key.verify(payload),
            None => true,
        };
        if !authorized {
            return self.violate(slot, code::UNAUTHORIZED, "authentication failed");
        }
        let t = &mut self.tables;
        let c = &mut t.conns[slot as usize];
        c.state = ConnState::Open;
        c.features = wanted & FEATURES_DEFINED;
        put_hello_ack_features(&mut c.out_fill, c.features, t.cfg.payload_bytes_max, &t.cfg.server_name);
        t.n.frames_out += 1;
    }

    /// REQUEST checks, in order: stream 0 (violation), id in use (409),
    /// parameters (400), shutting down (503); then scheduling.
    fn request(&mut self, slot: u32, stream_id: u64, arg: u32, flags: u16, payload: &[u8]) {
        if stream_id == 0 {
            return self.violate(slot, code::BAD_REQUEST, "REQUEST on stream 0");
        }
        if self.tables.conns[slot as usize].find_stream(stream_id).is_some() {
            return self.reject(slot, stream_id, code::STREAM_IN_USE, "stream id already in use");
        }
        // The flags the header check let through say how the payload
        // reads (the session key extension, docs/PROTOCOL.md).
        let (req, session) = match cnse_proto::parse_request(payload, flags, &self.limits) {
            Ok(r) => r,
            Err((c, m)) => return self.reject(slot, stream_id, c, m),
        };
        if self.shutting_down.is_some() {
            return self.reject(slot, stream_id, code::SHUTTING_DOWN, "server shutting down");
        }
        let admitted = Admitted {
            stream_id,
            credit: Credit::from_initial(arg),
            req,
            chat: None,
            session,
        };
        if let Err((code, message)) = self.schedule(slot, admitted) {
            self.reject(slot, stream_id, code, message);
        }
    }

    /// ERROR on a stream that never opened.
    pub(super) fn reject(&mut self, slot: u32, stream_id: u64, code: u32, message: &str) {
        self.log_refusal("request refused", code, message);
        let t = &mut self.tables;
        put_error(&mut t.conns[slot as usize].out_fill, stream_id, code, message);
        t.n.frames_out += 1;
        t.n.rejected += 1;
        t.metrics.outcome(false, crate::metrics::Outcome::Rejected);
        t.metrics.error(code);
    }

    /// CANCEL: the backend's work is stopped (or the queued entry removed)
    /// and the stream ends with END reason 2.
    fn cancel(&mut self, slot: u32, stream_id: u64) {
        let Some(i) = self.tables.conns[slot as usize].find_stream(stream_id) else {
            return;
        };
        let now_us = self.tables.now_us;
        let sslot = self.tables.conns[slot as usize].streams[i].1;
        self.stop_stream(sslot);
        let s = &self.tables.streams[sslot as usize];
        let (ttft, total) = super::flush::times(s, now_us);
        let sent = s.sent;
        put_end(
            &mut self.tables.conns[slot as usize].out_fill,
            stream_id,
            FinishReason::Cancelled,
            sent,
            ttft,
            total,
        );
        self.tables.n.frames_out += 1;
        // Counted as a disconnect's cancellations are (`drop_streams`):
        // without it a CANCEL was in no outcome of `cnse_requests_total`.
        let http = self.tables.conns[slot as usize].proto == crate::conn::Proto::Http;
        self.tables.metrics.outcome(http, crate::metrics::Outcome::Cancelled);
        self.tables.conns[slot as usize].streams.swap_remove(i);
        self.tables.free_stream(sslot);
    }

    /// Protocol violation: ERROR on stream 0, cancel every stream (no END),
    /// send what is pending, close.
    pub(super) fn violate(&mut self, slot: u32, code: u32, message: &str) {
        self.log_refusal("protocol violation, connection closed", code, message);
        self.drop_streams(slot);
        let t = &mut self.tables;
        t.n.violations += 1;
        t.metrics.error(code);
        let c = &mut t.conns[slot as usize];
        put_error(&mut c.out_fill, 0, code, message);
        t.n.frames_out += 1;
        c.state = ConnState::Draining {
            deadline: t.now + DRAIN_TIMEOUT,
        };
        t.mark_dirty(slot);
    }

    pub(super) fn drop_streams(&mut self, slot: u32) {
        let http = self.tables.conns[slot as usize].proto == crate::conn::Proto::Http;
        while let Some((_, sslot)) = self.tables.conns[slot as usize].streams.pop() {
            self.tables.metrics.outcome(http, crate::metrics::Outcome::Cancelled);
            self.stop_stream(sslot);
            self.tables.free_stream(sslot);
        }
    }
}
