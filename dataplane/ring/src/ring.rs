//! The ring: submission with a full-queue path, timed turns, reaping into a
//! caller's list, in-flight accounting, and a teardown that cancels and
//! drains every operation before the caller frees what they point at.

use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::{RingError, Tag, RING_KIND};

/// How a ring is set up.
#[derive(Clone, Copy, Debug)]
pub struct RingConfig {
    /// Submission queue entries (a power of two).
    pub entries: u32,
    /// Completion queue entries as a multiple of `entries` (multishot ops
    /// post many completions per submission).
    pub cq_factor: u32,
    /// One thread submits and reaps (IORING_SETUP_SINGLE_ISSUER) and
    /// completion task work runs only when it waits
    /// (IORING_SETUP_DEFER_TASKRUN), so the kernel does not interrupt the
    /// loop to post completions. Falls back to a plain ring where the kernel
    /// refuses it.
    pub single_issuer: bool,
    /// With deferred task work, the kernel runs at most 20 task-work items
    /// (receives that became ready, for one) per enter and keeps the rest
    /// for the next. A turn enters again, up to this many times, while an
    /// enter still adds completions: what is ready is handled in this turn,
    /// not spread over the next ones while it waits. 0 or 1: one enter.
    pub drain_passes: u32,
    /// Batched waiting (Linux 6.12's `min_wait_usec`): a turn that blocks
    /// waits for [`BATCH_WANT`] completions, or until this much time has
    /// passed since it began to wait with at least one completion there.
    /// A completion that finds the window over (an idle loop) ends the wait
    /// at once, so it adds nothing to a lone request's latency; under a
    /// steady trickle one wake-up and one enter carry many completions
    /// instead of one each. Zero: wait for one completion (the default).
    pub batch_wait: Duration,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            entries: 4096,
            cq_factor: 4,
            single_issuer: true,
            drain_passes: DRAIN_PASSES_DEFAULT,
            batch_wait: Duration::ZERO,
        }
    }
}

/// Completions a batched wait ([`RingConfig::batch_wait`]) stops at before
/// its window is over.
pub const BATCH_WANT: usize = 32;

/// A blocking wait with no deadline of its own still passes one when it
/// batches: without an overall timeout the kernel ends the wait when the
/// window does, completions or not, and an idle loop would wake each
/// window.
const BATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(1);

/// Default of [`RingConfig::drain_passes`]: up to about 1,280 task-work
/// items per turn.
pub const DRAIN_PASSES_DEFAULT: u32 = 64;

/// Task-work items the kernel runs per enter (`IO_LOCAL_TW_DEFAULT_MAX`).
const KERNEL_TW_BATCH: usize = 20;

/// What the kernel set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingMode {
    /// Single issuer with deferred task work.
    SingleIssuerDeferred,
    /// A plain ring (the kernel refused the flags, or they were not asked for).
    Plain,
}

/// One completion, copied out of the completion queue.
#[derive(Clone, Copy, Debug)]
pub struct Completion {
    pub tag: Tag,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// The op posts more completions (multishot).
    #[inline]
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer a buffer-select op filled.
    #[inline]
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }

    /// The errno of a failed op.
    #[inline]
    pub fn errno(&self) -> Option<i32> {
        (self.result < 0).then_some(-self.result)
    }

    /// The result as a count, or the op's error with its errno.
    pub fn check(&self, op: &'static str) -> Result<u32, RingError> {
        if self.result < 0 {
            Err(RingError::from_result(op, self.result))
        } else {
            Ok(self.result as u32)
        }
    }
}

/// The one io_uring of a loop.
pub struct Ring {
    ring: IoUring,
    mode: RingMode,
    /// Ops submitted (or queued for submission) whose last completion has
    /// not been reaped.
    in_flight: u64,
    /// Completions reaped while `push` made room (a backed-up completion
    /// queue); handed out first by the next turn. At most one completion
    /// queue's worth per stalled push.
    stash: Vec<Completion>,
    drain_passes: u32,
    /// [`RingConfig::batch_wait`] in µs (0: off).
    batch_wait_us: u32,
}

impl Ring {
    pub fn new(cfg: RingConfig) -> Result<Ring, RingError> {
        let ring = Self::setup(cfg)?;
        if !cfg.batch_wait.is_zero() && !ring.ring.params().is_feature_min_timeout() {
            return Err(RingError::new(
                "setup",
                std::io::Error::new(
                    std::io::ErrorKind::Unsupported,
                    "batched waiting needs Linux 6.12 or later (IORING_FEAT_MIN_TIMEOUT)",
                ),
            ));
        }
        Ok(ring)
    }

    fn setup(cfg: RingConfig) -> Result<Ring, RingError> {
        assert!(cfg.entries.is_power_of_two(), "ring entries must be a power of two");
        let cq = cfg.entries * cfg.cq_factor.max(1);
        let batch_wait_us = cfg.batch_wait.as_micros().min(u32::MAX as u128) as u32;
        if cfg.single_issuer {
            let ring = IoUring::builder()
                .setup_cqsize(cq)
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_submit_all()
                .build(cfg.entries);
            if let Ok(ring) = ring {
                return Ok(Ring {
                    ring,
                    mode: RingMode::SingleIssuerDeferred,
                    in_flight: 0,
                    stash: Vec::new(),
                    drain_passes: cfg.drain_passes,
                    batch_wait_us,
                });
            }
        }
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            .build(cfg.entries)
            .map_err(|e| RingError::new("setup", e))?;
        Ok(Ring {
            ring,
            mode: RingMode::Plain,
            in_flight: 0,
            stash: Vec::new(),
            drain_passes: cfg.drain_passes,
            batch_wait_us,
        })
    }

    pub fn mode(&self) -> RingMode {
        self.mode
    }

    /// The underlying ring, for registrations (buffer rings, files).
    pub fn raw(&self) -> &IoUring {
        &self.ring
    }

    /// Ops in flight (submitted or queued, last completion not reaped).
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// Queues `entry` under `tag`. A full submission queue is handed to the
    /// kernel first (with completions run, so a full completion queue
    /// cannot wedge it).
    ///
    /// # Safety
    /// Every buffer and descriptor `entry` points at must stay valid and
    /// untouched until the op's last completion is reaped (also after a
    /// cancel, and through [`Ring::teardown`]).
    pub unsafe fn push(&mut self, entry: squeue::Entry, tag: Tag) -> Result<(), RingError> {
        assert!(tag.kind() != RING_KIND, "op kind 0 is the ring's own");
        // SAFETY: forwarded to the caller's contract.
        unsafe { self.push_raw(entry.user_data(tag.raw())) }
    }

    /// # Safety
    /// As [`Ring::push`].
    unsafe fn push_raw(&mut self, entry: squeue::Entry) -> Result<(), RingError> {
        loop {
            // SAFETY: the caller keeps what the entry points at valid until
            // its completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return Ok(());
            }
            // Submission queue full: hand it to the kernel. EBUSY means the
            // completion queue is backed up: reap it into the stash (the
            // next turn hands those out first) and try again.
            match self.enter(0) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::EBUSY) => {
                    let mut stash = std::mem::take(&mut self.stash);
                    self.reap(&mut stash);
                    self.stash = stash;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued and runs deferred task work without waiting
    /// (`IORING_ENTER_GETEVENTS` with no minimum: with `DEFER_TASKRUN` a
    /// plain submit would leave recv, accept and send completions in the
    /// kernel).
    fn enter(&mut self, want: u32) -> Result<(), RingError> {
        let to_submit = self.ring.submission().len() as u32;
        // SAFETY: enter with no argument struct; the kernel reads only the
        // ring's own queues.
        let r = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, want, io_uring::EnterFlags::GETEVENTS.bits(), None)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(()),
            Err(e) => Err(RingError::new("enter", e)),
        }
    }

    /// One turn: submits what is queued, waits up to `timeout` for a
    /// completion (`None`: until one arrives; zero: not at all, but
    /// deferred task work still runs), and appends every completion to
    /// `out`. Completions of the ring's own ops are not handed out.
    pub fn turn(&mut self, timeout: Option<Duration>, out: &mut Vec<Completion>) -> Result<(), RingError> {
        if !self.stash.is_empty() {
            out.append(&mut self.stash);
            self.enter(0)?;
        } else if !self.ring.completion().is_empty() {
            self.enter(0)?;
        } else {
            match timeout {
                Some(t) if t.is_zero() => self.enter(0)?,
                // A deadline inside the window: the kernel would end the
                // wait at the window's end (or at the deadline with fewer
                // completions): a plain wait does the same.
                t if self.batch_wait_us > 0 && t.is_none_or(|t| t.as_micros() > self.batch_wait_us as u128) => {
                    let ts = types::Timespec::from(t.unwrap_or(BATCH_IDLE_TIMEOUT));
                    let args = types::SubmitArgs::new().timespec(&ts).min_wait_usec(self.batch_wait_us);
                    self.wait_with(BATCH_WANT, &args)?;
                }
                Some(t) => {
                    let ts = types::Timespec::from(t);
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.wait_with(1, &args)?;
                }
                None => match self.ring.submitter().submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                    Err(e) => return Err(RingError::new("wait", e)),
                },
            }
        }
        self.drain()?;
        self.reap(out);
        Ok(())
    }

    /// Submits and waits for `want` completions as `args` say; a timeout,
    /// a signal or a backed-up completion queue end the wait early.
    fn wait_with(&mut self, want: usize, args: &types::SubmitArgs<'_, '_>) -> Result<(), RingError> {
        match self.ring.submitter().submit_with_args(want, args) {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => Ok(()),
            Err(e) => Err(RingError::new("wait", e)),
        }
    }

    /// Enters again while the last enter added completions (deferred task
    /// work beyond the kernel's per-enter batch), up to `drain_passes`
    /// enters and half the completion queue.
    fn drain(&mut self) -> Result<(), RingError> {
        if self.mode != RingMode::SingleIssuerDeferred {
            return Ok(());
        }
        let room = self.ring.params().cq_entries() as usize / 2;
        let mut seen = self.ring.completion().len();
        let mut added = seen;
        for _ in 1..self.drain_passes {
            // Fewer completions than the kernel's batch: the batch was not
            // used up, nothing deferred is left (what comes in meanwhile is
            // the next turn's).
            if added < KERNEL_TW_BATCH || seen >= room {
                break;
            }
            self.enter(0)?;
            let now = self.ring.completion().len();
            added = now - seen;
            seen = now;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let c = Completion {
                tag: Tag::from_raw(cqe.user_data()),
                result: cqe.result(),
                flags: cqe.flags(),
            };
            if !c.more() {
                debug_assert!(self.in_flight > 0, "a completion for an op never pushed");
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            if c.tag.kind() != RING_KIND {
                out.push(c);
            }
        }
    }

    /// Cancels every op in flight and reaps until none is left or `limit`
    /// passes; the completions go to `out` so the caller can release what
    /// they held. Only after this may the caller close descriptors and free
    /// buffers that ops pointed at. Returns the ops still in flight (0
    /// unless the kernel did not finish within `limit`).
    pub fn teardown(&mut self, limit: Duration, out: &mut Vec<Completion>) -> Result<u64, RingError> {
        let deadline = Instant::now() + limit;
        let mut cancel_sent = false;
        while self.in_flight > 0 {
            if !cancel_sent && self.in_flight > 0 {
                let e = opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(Tag::wide(RING_KIND, 0).raw());
                // SAFETY: a cancel points at no memory.
                unsafe { self.push_raw(e)? };
                cancel_sent = true;
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let before = self.in_flight;
            self.turn(Some((deadline - now).min(Duration::from_millis(50))), out)?;
            if self.in_flight == before {
                // Ops that started after the cancel ran (a re-armed
                // multishot) need another.
                cancel_sent = false;
            }
        }
        Ok(self.in_flight)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // The owner did not tear down: still wait for the kernel to let
            // go of in-flight ops before the ring's memory goes (what they
            // point at is the owner's to keep alive; see `push`).
            let mut sink = Vec::new();
            let _ = self.teardown(Duration::from_secs(1), &mut sink);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    crate::op_kinds! {
        enum TestOp { Nop = 1, Read = 2, Timeout = 3 }
    }

    #[test]
    fn a_zero_timeout_turn_delivers_completions_of_deferred_task_work() {
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut buf = [0u8; 8];
        let e = opcode::Recv::new(types::Fd(a.as_raw_fd()), buf.as_mut_ptr(), buf.len() as u32).build();
        // SAFETY: buf and the socket outlive the op (reaped below or drained
        // by teardown before they go).
        unsafe { ring.push(e, Tag::slot(TestOp::Read.code(), 3, 9)).unwrap() };
        let mut out = Vec::new();
        ring.turn(Some(Duration::ZERO), &mut out).unwrap();
        assert!(out.is_empty());
        use std::io::Write;
        (&b).write_all(b"ping").unwrap();
        // Never block: only zero-timeout turns, as a loop whose backend is
        // always due would make.
        let start = Instant::now();
        while out.is_empty() && start.elapsed() < Duration::from_secs(5) {
            ring.turn(Some(Duration::ZERO), &mut out).unwrap();
        }
        assert_eq!(
            out.len(),
            1,
            "the recv completion must arrive through zero-timeout turns"
        );
        let c = out[0];
        assert_eq!(
            (c.tag.kind(), c.tag.slot_index(), c.tag.gen()),
            (TestOp::Read.code(), 3, 9)
        );
        assert_eq!(c.check("recv").unwrap(), 4);
        assert_eq!(&buf[..4], b"ping");
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn one_turn_delivers_every_ready_receive_not_the_kernels_batch_of_20() {
        use std::io::Write;
        const N: usize = 100;
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        if ring.mode() != RingMode::SingleIssuerDeferred {
            eprintln!("SKIP: the kernel refused DEFER_TASKRUN; nothing is deferred");
            return;
        }
        let pairs: Vec<_> = (0..N)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        let mut bufs = vec![[0u8; 8]; N];
        for (i, ((a, _), buf)) in pairs.iter().zip(bufs.iter_mut()).enumerate() {
            let e = opcode::Recv::new(types::Fd(a.as_raw_fd()), buf.as_mut_ptr(), 8).build();
            // SAFETY: bufs and sockets outlive the ops (all reaped below).
            unsafe { ring.push(e, Tag::slot(TestOp::Read.code(), i as u32, 0)).unwrap() };
        }
        let mut out = Vec::new();
        ring.turn(Some(Duration::ZERO), &mut out).unwrap();
        assert!(out.is_empty());
        // All ready before the next turn: each is one task-work item.
        for (_, b) in &pairs {
            (&*b).write_all(b"x").unwrap();
        }
        ring.turn(Some(Duration::from_secs(5)), &mut out).unwrap();
        assert_eq!(out.len(), N, "one turn hands out every receive that was ready");
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn a_timed_turn_returns_at_the_timeout() {
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        let mut out = Vec::new();
        let start = Instant::now();
        ring.turn(Some(Duration::from_millis(30)), &mut out).unwrap();
        let waited = start.elapsed();
        assert!(out.is_empty());
        assert!(waited >= Duration::from_millis(25), "returned after {waited:?}");
    }

    #[test]
    fn pushing_past_a_full_submission_queue_submits_and_goes_on() {
        let mut ring = Ring::new(RingConfig {
            entries: 8,
            cq_factor: 64,
            single_issuer: true,
            ..RingConfig::default()
        })
        .unwrap();
        for i in 0..100 {
            // SAFETY: a NOP points at no memory.
            unsafe {
                ring.push(opcode::Nop::new().build(), Tag::wide(TestOp::Nop.code(), i))
                    .unwrap()
            };
        }
        let mut out = Vec::new();
        let start = Instant::now();
        while out.len() < 100 && start.elapsed() < Duration::from_secs(5) {
            ring.turn(Some(Duration::from_millis(10)), &mut out).unwrap();
        }
        let mut seen: Vec<u64> = out.iter().map(|c| c.tag.wide_value()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
        assert_eq!(ring.in_flight(), 0);
    }

    #[test]
    fn teardown_cancels_and_drains_every_op_before_returning() {
        let mut ring = Ring::new(RingConfig::default()).unwrap();
        let pairs: Vec<_> = (0..16)
            .map(|_| std::os::unix::net::UnixStream::pair().unwrap())
            .collect();
        let mut bufs = vec![[0u8; 64]; 16];
        for (i, ((a, _), buf)) in pairs.iter().zip(bufs.iter_mut()).enumerate() {
            let e = opcode::Recv::new(types::Fd(a.as_raw_fd()), buf.as_mut_ptr(), 64).build();
            // SAFETY: sockets and buffers outlive the teardown below.
            unsafe { ring.push(e, Tag::slot(TestOp::Read.code(), i as u32, 0)).unwrap() };
        }
        let ts = types::Timespec::new().sec(3600);
        let e = opcode::Timeout::new(&ts).build();
        // SAFETY: ts outlives the teardown below.
        unsafe { ring.push(e, Tag::wide(TestOp::Timeout.code(), 1)).unwrap() };
        let mut out = Vec::new();
        ring.turn(Some(Duration::ZERO), &mut out).unwrap();
        assert_eq!(ring.in_flight(), 17);
        let left = ring.teardown(Duration::from_secs(5), &mut out).unwrap();
        assert_eq!(left, 0);
        assert_eq!(out.len(), 17, "every op's last completion is handed back");
        assert!(out.iter().all(|c| c.errno() == Some(libc::ECANCELED)));
    }
}
