//! The pooled connection slots on the ring: one place per opcode for the
//! submissions (CONNECT, SEND, RECV, CLOSE, ASYNC_CANCEL, NOP) and the
//! completion that moves a slot's [`Conn`] state on. A slot has at most
//! one op in flight, and its buffers are the kernel's until that op's
//! completion, even after a cancel.

use cnse_backend::{Io, Sink};

use super::{Attempt, Conn, Flow, LlamaBackend, Phase, Task};
use crate::op::{self, OpKind};

impl LlamaBackend {
    pub(super) fn open_connect(&mut self, i: usize, io: &mut dyn Io) -> std::io::Result<()> {
        let slot = &mut self.slots[i];
        assert_eq!(slot.conn, Conn::Closed);
        let addr = &self.addrs[slot.upstream];
        let fd = op::socket(addr)?;
        slot.conn = Conn::Connecting(fd);
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
                if let Conn::Cancelling { fd, .. } = self.slots[i].conn {
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
