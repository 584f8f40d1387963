//! The one place that picks std or loom primitives: the shared structures
//! (task state, admission gate, inbox) use these, so the loom models
//! (`--cfg cnse_loom`) run the same code the scheduler runs.

#[cfg(cnse_loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
#[cfg(cnse_loom)]
pub(crate) use loom::sync::{Arc, Mutex};

#[cfg(not(cnse_loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
#[cfg(not(cnse_loom))]
pub(crate) use std::sync::{Arc, Mutex};
