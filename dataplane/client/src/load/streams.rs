//! The streams of one connection: slots, the requests (or PINGs) they
//! issue, and what each frame from the server does to them. Pure: no ring,
//! only bytes out (`out`) and typed frames in; the one system call is the
//! `shutdown` of a lost connection, which hands back its ops' buffers.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use cnse_proto::{put_credit, put_ping, put_request, Kind, Params};

use super::config::Mode;
use super::report::ThreadStats;

/// Bits of a stream id that name the slot (the rest is the slot's
/// generation).
const SLOT_BITS: u32 = 16;
const _: () = assert!(super::INFLIGHT_MAX < 1 << SLOT_BITS);

/// Whether a slot has a stream open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum SlotState {
    #[default]
    Idle,
    /// A request was sent; its END, PONG or ERROR has not arrived.
    Busy,
}

#[derive(Clone, Copy, Default)]
pub(super) struct Slot {
    state: SlotState,
    /// Counted in the histograms (intended after the warm-up).
    recorded: bool,
    generation: u64,
    /// When the request was meant to go out (open loop) or went out.
    intended_ns: u64,
    /// When it was written for the kernel (open loop: the schedule's lag
    /// is `sent_ns - intended_ns`).
    sent_ns: u64,
    /// Arrival of the previous TOKENS frame.
    last_ns: u64,
    tokens: u64,
    /// Tokens received since credit was last granted.
    unacked: u32,
    /// Credit granted so far (initial plus CREDIT frames); 0 = unlimited.
    granted: u64,
}

/// The stream side of a connection, split from its receive buffer so that
/// frames decoded in place can be handled while this is borrowed mutably.
pub(super) struct Streams {
    pub(super) fd: RawFd,
    /// Open loop: idle slots (a stack, preallocated to `inflight`).
    pub(super) free: Vec<u32>,
    /// In the loop's `ready` queue.
    pub(super) ready: bool,
    /// Frames being built this turn.
    pub(super) out: Vec<u8>,
    pub(super) alive: bool,
    /// Slots in [`SlotState::Busy`].
    pub(super) busy: usize,
    pub(super) slots: Box<[Slot]>,
    /// HTTP and RESP modes: slots in the order their requests went out
    /// (answers come back in that order).
    pub(super) order: VecDeque<u32>,
}

/// Run phases as nanoseconds since the thread's clock origin.
#[derive(Clone, Copy)]
pub(super) struct Phase {
    pub(super) measure_from_ns: u64,
    pub(super) end_ns: u64,
}

impl Phase {
    pub(super) fn in_window(&self, t_ns: u64) -> bool {
        t_ns >= self.measure_from_ns && t_ns < self.end_ns
    }
}

/// What frame handling asks of the loop.
pub(super) struct Ctx<'a> {
    pub(super) stats: &'a mut ThreadStats,
    /// Open loop: connections with a free slot, each at most once.
    pub(super) ready: &'a mut VecDeque<u32>,
    pub(super) mode: &'a Mode,
    pub(super) ping_payload: &'a [u8],
    pub(super) phase: Phase,
    pub(super) closed_loop: bool,
    pub(super) stopping: bool,
    /// Measured requests this thread may still issue.
    pub(super) quota: &'a mut u64,
    /// The loop's clock when this batch of work began.
    pub(super) now: u64,
}

/// Sends one request (or PING) on slot `s`; false when the request bound
/// leaves none to send.
pub(super) fn issue(conn: &mut Streams, s: usize, intended_ns: u64, now: u64, ctx: &mut Ctx) -> bool {
    let recorded = intended_ns >= ctx.phase.measure_from_ns;
    if recorded {
        if *ctx.quota == 0 {
            return false;
        }
        *ctx.quota -= 1;
    }
    let slot = &mut conn.slots[s];
    debug_assert_eq!(slot.state, SlotState::Idle);
    slot.state = SlotState::Busy;
    slot.generation += 1;
    slot.recorded = recorded;
    slot.intended_ns = intended_ns;
    slot.sent_ns = now;
    slot.last_ns = 0;
    slot.tokens = 0;
    slot.unacked = 0;
    slot.granted = match ctx.mode {
        Mode::Generate { credit, .. } => u64::from(*credit),
        Mode::Ping { .. } | Mode::Http { .. } | Mode::Resp => 0,
    };
    conn.busy += 1;
    let id = stream_id(s, slot.generation);
    match ctx.mode {
        Mode::Ping { .. } => put_ping(&mut conn.out, id, s as u32, intended_ns, ctx.ping_payload),
        Mode::Resp => {
            conn.out.extend_from_slice(super::resp::PING);
            conn.order.push_back(s as u32);
        }
        Mode::Http {
            max_tokens,
            temperature,
            prompt,
            include_usage,
        } => {
            let body = super::http::Body {
                prompt,
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: slot.generation,
                include_usage: *include_usage,
            };
            super::http::put_request(&mut conn.out, &body);
            conn.order.push_back(s as u32);
        }
        Mode::Generate {
            max_tokens,
            credit,
            temperature,
            prompt,
        } => {
            let params = Params {
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: slot.generation,
                ..Params::default()
            };
            put_request(&mut conn.out, id, *credit, &params, prompt.as_bytes());
        }
    }
    if ctx.phase.in_window(now) {
        ctx.stats.frames_out += 1;
    }
    true
}

fn stream_id(slot: usize, generation: u64) -> u64 {
    (generation << SLOT_BITS) | (slot as u64 + 1)
}

/// The slot a stream id names, if it is the slot's current stream.
fn slot_of(conn: &Streams, id: u64) -> Option<usize> {
    let s = (id & ((1 << SLOT_BITS) - 1)).checked_sub(1)? as usize;
    let slot = conn.slots.get(s)?;
    (slot.state == SlotState::Busy && slot.generation == id >> SLOT_BITS).then_some(s)
}

impl Streams {
    /// HTTP mode: an event of slot `s`'s response arrived (`first`: its
    /// first, the time to first token).
    pub(super) fn http_event(&mut self, s: usize, first: bool, now: u64, ctx: &mut Ctx) {
        let slot = &mut self.slots[s];
        if slot.recorded {
            if first {
                ctx.stats.ttft.record_us(now.saturating_sub(slot.intended_ns) / 1000);
            } else {
                ctx.stats.inter_token.record_us(now.saturating_sub(slot.last_ns) / 1000);
            }
        }
        slot.last_ns = now;
        slot.tokens += 1;
        if ctx.phase.in_window(now) {
            ctx.stats.frames_in += 1;
        }
    }

    /// HTTP mode: `n` more tokens of slot `s`'s response arrived packed
    /// into its events: counted as coalesced (as tokens packed into one
    /// binary frame), not as 0 µs gaps.
    pub(super) fn http_packed(&mut self, s: usize, n: u64, in_window: bool, ctx: &mut Ctx) {
        if in_window {
            ctx.stats.tokens_coalesced += n;
        }
        self.slots[s].tokens += n;
    }

    /// HTTP mode: slot `s`'s request got no answer before the server closed
    /// the connection; it is written again for the new one. A closed loop
    /// measures from this send (the first went to a connection that was
    /// closing); an open loop still from the intended time.
    pub(super) fn http_resend(&mut self, s: usize, now: u64, ctx: &Ctx) {
        let slot = &mut self.slots[s];
        debug_assert_eq!(slot.state, SlotState::Busy);
        if ctx.closed_loop {
            slot.intended_ns = now;
        }
        slot.sent_ns = now;
        if let Mode::Http {
            max_tokens,
            temperature,
            prompt,
            include_usage,
        } = ctx.mode
        {
            let body = super::http::Body {
                prompt,
                max_tokens: *max_tokens,
                temperature: *temperature,
                seed: slot.generation,
                include_usage: *include_usage,
            };
            super::http::put_request(&mut self.out, &body);
        }
    }
}

/// Slot `s` was answered with an error (an ERROR frame, or a RESP error
/// reply): counted under `code` and timed in `e2e_error`, apart from the
/// answers that succeeded.
pub(super) fn fail(conn: &mut Streams, c: usize, s: usize, now: u64, code: u32, ctx: &mut Ctx) {
    *ctx.stats.errors.entry(code).or_default() += 1;
    let slot = &conn.slots[s];
    if slot.recorded {
        ctx.stats
            .e2e_error
            .record_us(now.saturating_sub(slot.intended_ns) / 1000);
    }
    finish(conn, c, s, now, false, ctx);
}

/// HTTP mode: slot `s`'s response ended.
pub(super) fn finish_http(conn: &mut Streams, c: usize, s: usize, now: u64, ok: bool, ctx: &mut Ctx) {
    if !ok {
        ctx.stats.bad_frames += u64::from(conn.slots[s].state != SlotState::Busy);
    }
    finish(conn, c, s, now, ok, ctx);
}

/// A stream ended: record, then free or re-issue its slot.
pub(super) fn finish(conn: &mut Streams, c: usize, s: usize, now: u64, ok: bool, ctx: &mut Ctx) {
    let slot = &mut conn.slots[s];
    if ok {
        if slot.recorded {
            ctx.stats.e2e.record_us(now.saturating_sub(slot.intended_ns) / 1000);
            ctx.stats
                .send_delay
                .record_us(slot.sent_ns.saturating_sub(slot.intended_ns) / 1000);
            ctx.stats.rtt.record_us(now.saturating_sub(slot.sent_ns) / 1000);
            ctx.stats.last_done_ns = now;
        }
        // Request-bound runs count exactly their measured requests.
        if ctx.phase.in_window(now) && (slot.recorded || *ctx.quota == u64::MAX) {
            ctx.stats.requests += 1;
        }
    }
    slot.state = SlotState::Idle;
    conn.busy -= 1;
    if !conn.alive {
        return;
    }
    if ctx.closed_loop {
        if ctx.stopping {
            return;
        }
        // Past the request bound the slot just stays idle.
        let _ = issue(conn, s, now, now, ctx);
    } else {
        // Also while draining: the open loop's backlog (requests intended
        // inside the window that found no free slot) still goes out.
        conn.free.push(s as u32);
        if !conn.ready {
            conn.ready = true;
            ctx.ready.push_back(c as u32);
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn on_frame(
    conn: &mut Streams,
    c: usize,
    kind: Kind,
    id: u64,
    arg: u32,
    aux: u64,
    check: bool,
    now: u64,
    ctx: &mut Ctx,
) {
    if ctx.phase.in_window(now) {
        ctx.stats.frames_in += 1;
    }
    if kind == Kind::Error && id == 0 {
        // The server is closing the connection; its streams are gone.
        *ctx.stats.errors.entry(arg).or_default() += 1;
        return;
    }
    let Some(s) = slot_of(conn, id) else {
        ctx.stats.bad_frames += 1;
        return;
    };
    match kind {
        Kind::Pong => {
            if !check || aux != conn.slots[s].intended_ns {
                ctx.stats.bad_frames += 1;
            }
            finish(conn, c, s, now, check, ctx);
        }
        Kind::Tokens => {
            let in_window = ctx.phase.in_window(now);
            let slot = &mut conn.slots[s];
            if aux != slot.tokens || arg == 0 {
                ctx.stats.bad_frames += 1;
            }
            if slot.recorded {
                if slot.tokens == 0 {
                    ctx.stats.ttft.record_us(now.saturating_sub(slot.intended_ns) / 1000);
                } else {
                    ctx.stats.inter_token.record_us(now.saturating_sub(slot.last_ns) / 1000);
                }
            }
            if in_window && arg > 1 {
                // Arrived together with the frame's first token: no gap of
                // their own (not 0 µs gaps in `inter_token`).
                ctx.stats.tokens_coalesced += u64::from(arg - 1);
            }
            slot.tokens += u64::from(arg);
            slot.last_ns = now;
            if slot.granted > 0 && slot.tokens > slot.granted {
                // The page: the sum of TOKENS `arg` never exceeds the credit.
                ctx.stats.bad_frames += 1;
            }
            if in_window {
                ctx.stats.tokens += u64::from(arg);
            }
            if let Mode::Generate { credit, .. } = ctx.mode {
                if *credit > 0 {
                    // Re-grant in halves of the window so the server never
                    // waits on a round trip while tokens are in flight.
                    slot.unacked = slot.unacked.saturating_add(arg);
                    if slot.unacked >= (*credit / 2).max(1) {
                        put_credit(&mut conn.out, id, slot.unacked);
                        slot.granted += u64::from(slot.unacked);
                        slot.unacked = 0;
                        if in_window {
                            ctx.stats.frames_out += 1;
                        }
                    }
                }
            }
        }
        Kind::End => {
            let ok = check && aux == conn.slots[s].tokens;
            if !ok {
                ctx.stats.bad_frames += 1;
            }
            finish(conn, c, s, now, ok, ctx);
        }
        Kind::Error => fail(conn, c, s, now, arg, ctx),
        Kind::HelloAck | Kind::Hello | Kind::Request | Kind::Cancel | Kind::Credit | Kind::Ping => {
            ctx.stats.bad_frames += 1;
        }
    }
}

/// The run gives up on the streams still open at `now` (the drain
/// timeout): each measured one counts in `e2e_unanswered` with the time
/// from its intended send to now, a lower bound of its latency.
pub(super) fn give_up(conn: &Streams, now: u64, stats: &mut ThreadStats) {
    for slot in conn.slots.iter() {
        if slot.state == SlotState::Busy && slot.recorded {
            stats
                .e2e_unanswered
                .record_us(now.saturating_sub(slot.intended_ns) / 1000);
        }
    }
}

/// The connection failed or was closed: its streams are lost (each
/// measured one counts as unanswered from its intended send until now).
pub(super) fn lose(conn: &mut Streams, ctx: &mut Ctx) {
    if !conn.alive {
        return;
    }
    conn.alive = false;
    ctx.stats.connections_lost += 1;
    give_up(conn, ctx.now, ctx.stats);
    for slot in conn.slots.iter_mut() {
        slot.state = SlotState::Idle;
    }
    conn.busy = 0;
    // SAFETY: shutdown on an fd this connection owns; it makes any recv or
    // send in flight complete so its buffer is handed back.
    unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
}
