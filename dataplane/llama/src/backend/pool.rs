//! The pooled connection slots on the ring: one place per opcode for the
//! submissions (CONNECT, SEND, RECV, CLOSE, ASYNC_CANCEL, NOP) and the
//! completion that moves a slot's [`Conn`] state on. A slot has at most
//! one op in flight, and its buffers are the kernel's until that op's
//! completion, even after a cancel.
//!
//! Spares: for each server, `spare_conns` idle connections per core are
//! kept connected ahead of requests (llama-server closes its connection
//! after every stream, so without them each request would wait for a
//! connect). An idle connection, spare or pooled, has a RECV armed: the
//! server closing it is seen at once and it is replaced, so a request is
//! not sent on a connection the server has already closed. A request that
//! takes one cancels that RECV and sends once its completion is back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cnse_backend::{Io, Sink};

use super::{Attempt, Conn, Flow, LlamaBackend, Phase, Slot, Task, CLOSES_AFTER_STREAM};
use crate::op::{self, OpKind};

/// The connection a new request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pick {
    /// An idle connection with its watching RECV armed.
    Watched,
    /// A spare whose CONNECT is still in flight.
    Connecting,
    /// No socket yet: one is opened for the request.
    Closed,
}

/// A spare the server closed sooner than this after its connect is not
/// replaced before [`SPARE_HOLD`] has passed (a server that accepts and
/// drops at once must not make a connect loop of us).
const SPARE_LIFE_MIN: Duration = Duration::from_millis(100);
const SPARE_HOLD: Duration = Duration::from_millis(500);

impl LlamaBackend {
    pub(super) fn open_connect(&mut self, i: usize, io: &mut dyn Io) -> std::io::Result<()> {
        let slot = &mut self.slots[i];
        assert_eq!(slot.conn, Conn::Closed);
        let addr = &self.addrs[slot.upstream];
        let fd = op::socket(addr)?;
        slot.conn = Conn::Connecting(fd);
        slot.keep_alive = false;
        slot.idle_since = None;
        slot.deadline = Some(io.now() + self.cfg.connect_timeout);
        slot.sent = 0;
        slot.recv_len = 0;
        slot.recv_pos = 0;
        slot.dec.reset();
        if let Task::Stream(w) = &mut slot.task {
            w.phase = Phase::Connecting;
        }
        // SAFETY: the address lives in `self.addrs`, a boxed slice that is
        // neither resized nor dropped while an operation is in flight (Drop
        // leaks it then).
        unsafe { io.submit(op::tag(i, OpKind::Connect), op::connect(fd, addr)) };
        Ok(())
    }

    pub(super) fn submit_send(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        let fd = match slot.conn {
            Conn::Ready(fd) => fd,
            other => unreachable!("send on a connection in state {other:?}"),
        };
        assert!(slot.sent < slot.send.len());
        slot.conn = Conn::Sending(fd);
        // SAFETY: `send` is not touched until this SEND completes (the slot
        // is in `Sending`, and the slot array is never moved or dropped
        // while an operation is in flight).
        unsafe { io.submit(op::tag(i, OpKind::Send), op::send(fd, &slot.send[slot.sent..])) };
    }

    pub(super) fn arm_recv(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        let Conn::Ready(fd) = slot.conn else {
            unreachable!("recv armed on a connection in state {:?}", slot.conn)
        };
        debug_assert_eq!(slot.recv_pos, slot.recv_len, "unprocessed bytes would be overwritten");
        slot.recv_len = 0;
        slot.recv_pos = 0;
        slot.conn = Conn::Receiving(fd);
        // SAFETY: `recv` is not read or written until this RECV completes
        // (the slot is in `Receiving`); the slot array stays put.
        unsafe { io.submit(op::tag(i, OpKind::Recv), op::recv(fd, &mut slot.recv)) };
    }

    /// Ends the slot's connection without reusing it: cancels the operation
    /// in flight (CLOSE follows its completion) or closes right away.
    pub(super) fn abort_conn(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        slot.deadline = None;
        match slot.conn {
            Conn::Closed | Conn::Closing | Conn::Cancelling { .. } => {}
            // Its RECV is already being cancelled.
            Conn::Reclaiming(fd) => slot.conn = Conn::Cancelling { fd, op: OpKind::Recv },
            Conn::Ready(fd) => {
                slot.conn = Conn::Closing;
                // SAFETY: CLOSE references no memory.
                unsafe { io.submit(op::tag(i, OpKind::Close), op::close(fd)) };
            }
            Conn::Connecting(fd) | Conn::Sending(fd) | Conn::Receiving(fd) => {
                let op = slot.conn.in_flight().expect("an operation is in flight");
                slot.conn = Conn::Cancelling { fd, op };
                // SAFETY: ASYNC_CANCEL references no memory; the fd stays
                // open until the cancelled operation has completed.
                unsafe { io.submit(op::tag(i, OpKind::Cancel), op::cancel_fd(fd)) };
            }
        }
    }

    pub(super) fn on_completion(&mut self, tag: u64, result: i32, io: &mut dyn Io, sink: &mut dyn Sink) {
        let Some((i, kind)) = op::untag(tag) else { return };
        if i >= self.slots.len() {
            return;
        }
        if kind == OpKind::Cancel {
            // Cancelling by fd needs Linux 5.19; where the kernel refuses
            // it, shutting the socket down wakes the operation instead.
            if result == -libc::EINVAL {
                if let Conn::Cancelling { fd, .. } | Conn::Reclaiming(fd) = self.slots[i].conn {
                    // SAFETY: fd is open (CLOSE is issued only after the
                    // cancelled operation completed); shutdown touches no
                    // memory of ours.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                }
            }
            return;
        }
        if kind == OpKind::Wake {
            // Stale when the stream ended or was replaced meanwhile: its
            // `wake` flag is then gone with it.
            let slot = &mut self.slots[i];
            if let Task::Stream(w) = &mut slot.task {
                if w.flow == Flow::Woken && matches!(slot.conn, Conn::Ready(_)) {
                    w.flow = Flow::Flowing;
                    self.process(i, io, sink);
                }
            }
            return;
        }
        let conn = self.slots[i].conn;
        match (conn, kind) {
            (Conn::Cancelling { fd, op }, k) if k == op => {
                self.slots[i].conn = Conn::Closing;
                // SAFETY: CLOSE references no memory.
                unsafe { io.submit(op::tag(i, OpKind::Close), op::close(fd)) };
            }
            (Conn::Closing, OpKind::Close) => {
                self.slots[i].conn = Conn::Closed;
                self.after_close(i, io, sink);
            }
            (Conn::Connecting(fd), OpKind::Connect) => {
                // Nothing is in flight any more, whatever the result.
                self.slots[i].conn = Conn::Ready(fd);
                if result < 0 {
                    let what = format!("connect: {}", errno_text(result));
                    return self.conn_failed(i, what, true, io, sink);
                }
                let slot = &mut self.slots[i];
                match &mut slot.task {
                    Task::Stream(w) => {
                        w.phase = Phase::AwaitHead;
                        slot.deadline = Some(io.now() + self.cfg.first_token_timeout);
                    }
                    Task::Health => {}
                    Task::Spare => return self.spare_connected(i, io),
                    Task::Drain | Task::None => unreachable!("connect without a task"),
                }
                self.submit_send(i, io);
            }
            (Conn::Sending(fd), OpKind::Send) => {
                self.slots[i].conn = Conn::Ready(fd);
                if result == -libc::EINTR || result == -libc::EAGAIN {
                    return self.submit_send(i, io);
                }
                if result <= 0 {
                    let what = format!("send: {}", errno_text(result.min(-libc::EPIPE)));
                    return self.conn_failed(i, what, true, io, sink);
                }
                let slot = &mut self.slots[i];
                slot.sent += result as usize;
                if slot.sent < slot.send.len() {
                    return self.submit_send(i, io);
                }
                self.arm_recv(i, io);
            }
            (Conn::Receiving(fd), OpKind::Recv) => {
                let slot = &mut self.slots[i];
                slot.conn = Conn::Ready(fd);
                if result == -libc::EINTR || result == -libc::EAGAIN || result == -libc::ENOBUFS {
                    return self.arm_recv(i, io);
                }
                if matches!(slot.task, Task::Spare) {
                    return self.idle_conn_ended(i, result, io);
                }
                if result < 0 {
                    let what = format!("recv: {}", errno_text(result));
                    return self.conn_failed(i, what, true, io, sink);
                }
                if result == 0 {
                    return self.on_eof(i, io, sink);
                }
                slot.recv_len = result as usize;
                slot.recv_pos = 0;
                if let Task::Stream(w) = &mut slot.task {
                    w.attempt = Attempt::Committed;
                }
                self.process(i, io, sink);
            }
            (Conn::Reclaiming(fd), OpKind::Recv) => {
                self.slots[i].conn = Conn::Ready(fd);
                if result == -libc::ECANCELED || result == -libc::EINTR || result == -libc::EAGAIN {
                    return self.submit_send(i, io);
                }
                // The server closed it (or spoke unasked) just as the
                // request took it: sent again on a fresh connection.
                let what = if result < 0 {
                    format!("recv: {}", errno_text(result))
                } else {
                    "closed by llama-server before the request".to_string()
                };
                self.conn_failed(i, what, false, io, sink);
            }
            _ => {
                // A completion that does not match the slot's state would be
                // a bookkeeping bug; dropping it is the only safe reaction.
                debug_assert!(false, "unexpected completion {kind:?} for slot {i} in {conn:?}");
            }
        }
    }
}

fn errno_text(res: i32) -> String {
    std::io::Error::from_raw_os_error(-res).to_string()
}

impl LlamaBackend {
    /// The connection for a new request to server `u`: a spare connected
    /// ahead first (a pooled one that carried an answer may be the one a
    /// server closes after each stream, its close still on the way), then
    /// a pooled one, then a spare still connecting, then a closed slot.
    pub(super) fn pick_slot(&self, u: usize) -> Option<(usize, Pick)> {
        let range = u * self.per_upstream..(u + 1) * self.per_upstream;
        let spare = |want: fn(&Slot) -> bool| {
            range
                .clone()
                .find(|&i| matches!(self.slots[i].task, Task::Spare) && want(&self.slots[i]))
        };
        if let Some(i) = spare(|s| matches!(s.conn, Conn::Receiving(_)) && !s.keep_alive) {
            return Some((i, Pick::Watched));
        }
        if let Some(i) = spare(|s| matches!(s.conn, Conn::Receiving(_))) {
            return Some((i, Pick::Watched));
        }
        if let Some(i) = spare(|s| matches!(s.conn, Conn::Connecting(_))) {
            return Some((i, Pick::Connecting));
        }
        range
            .clone()
            .find(|&i| matches!(self.slots[i].task, Task::None) && self.slots[i].conn == Conn::Closed)
            .map(|i| (i, Pick::Closed))
    }

    /// A request took idle connection `i`: its watching RECV is cancelled,
    /// and the SEND goes out on that RECV's completion.
    pub(super) fn reclaim(&mut self, i: usize, io: &mut dyn Io) {
        let slot = &mut self.slots[i];
        let Conn::Receiving(fd) = slot.conn else {
            unreachable!("reclaim of a connection in state {:?}", slot.conn)
        };
        slot.conn = Conn::Reclaiming(fd);
        // SAFETY: ASYNC_CANCEL references no memory; the RECV's buffer is
        // not touched until its completion (the slot is in `Reclaiming`).
        unsafe { io.submit(op::tag(i, OpKind::Cancel), op::cancel_fd(fd)) };
    }

    /// Opens spares of server `u` until this core has `spare_conns` of
    /// them (idle or connecting), on free slots only, while the process
    /// holds fewer than `spare_cap(u)` for `u`; closes this core's idle
    /// spares beyond that cap (streams that connected on their own took
    /// the places the spares were opened for).
    pub(super) fn fill_spares(&mut self, u: usize, io: &mut dyn Io) {
        self.publish_spares(u);
        let mut over = self.shared[u]
            .spares
            .load(Ordering::Acquire)
            .saturating_sub(self.spare_cap(u));
        if over > 0 {
            for i in u * self.per_upstream..(u + 1) * self.per_upstream {
                if over == 0 {
                    break;
                }
                let s = &self.slots[i];
                if s.ahead && matches!(s.task, Task::Spare) && matches!(s.conn, Conn::Receiving(_)) {
                    self.slots[i].task = Task::None;
                    self.abort_conn(i, io);
                    over -= 1;
                }
            }
            self.publish_spares(u);
        }
        // A server that keeps its connections has its pool: one spare
        // covers a burst's first request. One that closes after every
        // stream (llama-server) gets up to `spare_conns`.
        let want = if self.closes_after_stream[u] {
            self.cfg.spare_conns
        } else {
            self.cfg.spare_conns.min(1)
        };
        if want == 0 || !self.shared[u].healthy.load(Ordering::Acquire) {
            return;
        }
        if let Some(t) = self.spare_hold[u] {
            if io.now() < t {
                return;
            }
            self.spare_hold[u] = None;
        }
        let range = u * self.per_upstream..(u + 1) * self.per_upstream;
        let mut have = range
            .clone()
            .filter(|&i| matches!(self.slots[i].task, Task::Spare))
            .count();
        for i in range {
            if have >= want {
                break;
            }
            let slot = &self.slots[i];
            if !matches!(slot.task, Task::None) || slot.conn != Conn::Closed || slot.reserved {
                continue;
            }
            let cap = self.spare_cap(u);
            if self.shared[u]
                .spares
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < cap).then_some(n + 1))
                .is_err()
            {
                return;
            }
            self.spares_mine[u] += 1;
            self.slots[i].task = Task::Spare;
            if self.open_connect(i, io).is_err() {
                self.slots[i].task = Task::None;
                self.publish_spares(u);
                self.spare_hold[u] = Some(io.now() + SPARE_HOLD);
                return;
            }
            self.slots[i].ahead = true;
            have += 1;
        }
    }

    /// Spares server `u` may have over the process now: `spares_max`, and
    /// spares + streams within its places + 1, so that each finds one of
    /// its HTTP threads (llama-server has at least its slots + 2). Its
    /// places: `inflight_per_backend`, or its slots where `/slots` told
    /// fewer.
    fn spare_cap(&self, u: usize) -> usize {
        let sh = &self.shared[u];
        let busy = sh.inflight.load(Ordering::Acquire);
        let places = match sh.slots_known.load(Ordering::Acquire) {
            0 => self.cfg.inflight_per_backend,
            n => n.min(self.cfg.inflight_per_backend),
        };
        self.cfg.spares_max.min(places.saturating_sub(busy) + 1)
    }

    /// Brings this core's share of `Shared::spares` for `u` to the spares
    /// it holds now (those taken by a request or closed since leave it).
    pub(super) fn publish_spares(&mut self, u: usize) {
        let range = u * self.per_upstream..(u + 1) * self.per_upstream;
        let mut now = 0;
        for i in range {
            let s = &mut self.slots[i];
            if s.ahead && !matches!(s.task, Task::Spare) {
                s.ahead = false;
            }
            now += usize::from(s.ahead);
        }
        let before = std::mem::replace(&mut self.spares_mine[u], now);
        if now > before {
            self.shared[u].spares.fetch_add(now - before, Ordering::AcqRel);
        } else if before > now {
            self.shared[u].spares.fetch_sub(before - now, Ordering::AcqRel);
        }
    }

    fn spare_connected(&mut self, i: usize, io: &mut dyn Io) {
        self.llama.spares_opened += 1;
        self.watch(i, io);
    }

    /// Idle connection `i` (its reservation released) waits for a request
    /// with a RECV armed that sees the server close it.
    pub(super) fn watch(&mut self, i: usize, io: &mut dyn Io) {
        let now = io.now();
        let slot = &mut self.slots[i];
        slot.task = Task::Spare;
        slot.dec.reset();
        slot.idle_since = Some(now);
        slot.deadline = Some(now + self.cfg.keepalive_idle);
        self.release(i);
        self.arm_recv(i, io);
    }

    /// The watching RECV of idle connection `i` completed: the server
    /// closed it (0), sent something unasked, or it failed. It is closed;
    /// `poll` opens its replacement.
    fn idle_conn_ended(&mut self, i: usize, result: i32, io: &mut dyn Io) {
        self.llama.idle_closed += 1;
        let now = io.now();
        let slot = &self.slots[i];
        let (u, pooled) = (slot.upstream, slot.keep_alive);
        let idle_for = slot
            .idle_since
            .map_or(Duration::MAX, |t| now.saturating_duration_since(t));
        if pooled && result == 0 && idle_for < CLOSES_AFTER_STREAM {
            // Closed right after its last answer, whatever its Keep-Alive
            // header said (llama-server b10434 does so after every stream):
            // from now on its connections are closed after each answer,
            // and spares stand in for the pool.
            self.mark_closes_after_stream(u);
        }
        if !pooled && idle_for < SPARE_LIFE_MIN {
            self.spare_hold[u] = Some(now + SPARE_HOLD);
        }
        self.slots[i].task = Task::None;
        self.abort_conn(i, io);
    }

    pub(super) fn mark_closes_after_stream(&mut self, u: usize) {
        if !self.closes_after_stream[u] {
            self.closes_after_stream[u] = true;
            tracing::info!(
                upstream = %self.shared[u].target.url,
                "llama-server closes its connection after each answer: not pooling its connections"
            );
        }
    }

    /// The earliest time a held spare may be opened again.
    pub(super) fn spare_hold_until(&self) -> Option<Instant> {
        self.spare_hold.iter().flatten().min().copied()
    }
}

impl Drop for LlamaBackend {
    fn drop(&mut self) {
        for (s, &n) in self.shared.iter().zip(self.spares_mine.iter()) {
            s.spares.fetch_sub(n, Ordering::AcqRel);
        }
        let mut in_flight = false;
        for i in 0..self.slots.len() {
            self.release(i);
            match self.slots[i].conn {
                Conn::Ready(fd) => {
                    // SAFETY: nothing is in flight on this fd, which we own.
                    unsafe { libc::close(fd) };
                    self.slots[i].conn = Conn::Closed;
                }
                Conn::Closed => {}
                _ => in_flight = true,
            }
        }
        if in_flight {
            // The kernel may still write into these buffers or read the
            // addresses: leak them rather than free memory it owns.
            std::mem::forget(std::mem::replace(&mut self.slots, Box::new([])));
            std::mem::forget(std::mem::replace(&mut self.addrs, Box::new([])));
        }
    }
}
