//! The one io_uring core of cnse-dp, shared by every loop: the server's
//! workers, the load generator, and the llama backend's test and direct
//! drivers.
//!
//! - [`Tag`]: typed user_data (`[kind][slot][generation]` or
//!   `[kind][56-bit value]`), op kinds declared with [`op_kinds!`] and
//!   checked at compile time.
//! - [`Ring::push`]: submission with a full-queue path.
//! - [`Ring::turn`]: one loop turn: submit, wait up to a timeout (EINTR,
//!   EBUSY and ETIME are not errors), reap into the caller's list; a zero
//!   timeout still runs deferred task work, so with `DEFER_TASKRUN` a loop
//!   that is always due (a zero-delay backend) keeps receiving.
//! - [`Ring::teardown`]: cancels every op in flight and drains them, so
//!   descriptors are closed and buffers freed only after the kernel let go.
//! - [`BufRing`]: the provided-buffer ring for multishot receives.
//! - [`FixedBufs`]: registered (fixed) send buffers, lent one per send.
//! - [`pin_current_thread`]: core pinning.
//!
//! Errors carry the operation and the errno ([`RingError`]). The loop and
//! its crates are drawn in docs/ARCHITECTURE.md.

mod bufring;
mod error;
mod fixed;
mod pin;
mod ring;
mod tag;

pub use bufring::BufRing;
pub use error::RingError;
pub use fixed::{FixedBufs, FIXED_BUFS_MAX};
pub use pin::{allowed_cpus, pin_current_thread, pin_current_thread_to};
pub use ring::{Completion, Ring, RingConfig, RingMode, BATCH_WANT};
pub use tag::{Tag, GEN_BITS, KIND_BITS, RING_KIND, SLOT_BITS, SLOT_MAX, WIDE_BITS, WIDE_MAX};

pub use io_uring::{cqueue, opcode, squeue, types};
