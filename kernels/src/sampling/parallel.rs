//! `ParallelCpuSampler`: the fair CPU side of the GPU comparison. Rows are
//! split over a persistent pool of threads (all cores by default), each row
//! sampled by the vectorised `FastRow`; the ids are `CpuSampler`'s.
//!
//! The pool is started once. A batch is published under a mutex (an epoch
//! number, the rows, the output), the calling thread works on it too, and
//! rows are claimed one at a time from an atomic counter, so a slow row does
//! not hold a thread's fixed share. The caller returns only after every pool
//! thread has left the batch, so the borrowed rows and ids outlive each use.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::fast::{FastRow, Simd};
use super::{RowParams, SampleRow, SamplerConfig, TokenSampler};
use crate::KernelError;

/// Most threads a pool starts (the device machine has 16 cores).
pub const THREADS_MAX: usize = 256;

/// The vectorised CPU sampler on `threads` threads (the caller is one).
pub struct ParallelCpuSampler {
    config: SamplerConfig,
    threads: usize,
    params: Vec<RowParams>,
    own: FastRow,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

/// The batch pool threads work on; raw because the pool outlives each borrow.
#[derive(Clone, Copy)]
struct Batch {
    params: *const RowParams,
    out: *mut u32,
    rows: usize,
}

// SAFETY: a `Batch` is only dereferenced between its publication and the
// moment the publishing caller sees `busy == 0`; the caller keeps both slices
// borrowed for that whole time (see `ParallelCpuSampler::sample`).
unsafe impl Send for Batch {}

struct State {
    epoch: u64,
    batch: Option<Batch>,
    /// Pool threads still inside the current batch.
    busy: usize,
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    go: Condvar,
    done: Condvar,
    next_row: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a pool thread panicked while holding it; the
        // state is plain counters, still meaningful.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Samples rows claimed from the counter until none is left.
    fn work(&self, batch: Batch, row: &mut FastRow) {
        loop {
            let i = self.next_row.fetch_add(1, Ordering::Relaxed);
            if i >= batch.rows {
                return;
            }
            // SAFETY: i < rows, each i is claimed once, and the caller keeps
            // `params` and `out` alive and untouched until `busy == 0`.
            unsafe {
                *batch.out.add(i) = row.sample_synth(&*batch.params.add(i));
            }
        }
    }
}

/// Leaves the batch on drop, unwinding included, so the caller never waits
/// for a thread that died inside it.
struct Leave<'a>(&'a Shared);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.panicked |= std::thread::panicking();
        st.busy -= 1;
        if st.busy == 0 {
            self.0.done.notify_all();
        }
    }
}

/// Waits on drop until no pool thread is inside the batch, unwinding
/// included, so the borrowed rows and ids are never freed under a thread.
struct AwaitPool<'a>(&'a Shared);

impl Drop for AwaitPool<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        while st.busy > 0 {
            st = self.0.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.batch = None;
    }
}

fn pool_thread(shared: Arc<Shared>, mut row: FastRow) {
    let mut seen = 0u64;
    loop {
        let batch = {
            let mut st = shared.lock();
            while st.epoch == seen && !st.shutdown {
                st = shared.go.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.shutdown {
                return;
            }
            seen = st.epoch;
            st.batch
        };
        let _leave = Leave(&shared);
        if let Some(batch) = batch {
            shared.work(batch, &mut row);
        }
    }
}

/// All cores this process may run on.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ParallelCpuSampler {
    /// A sampler on `threads` threads (0: all cores) at the widest SIMD level.
    pub fn new(config: SamplerConfig, threads: usize) -> Result<Self, KernelError> {
        Self::with_simd(config, threads, Simd::detect())
    }

    /// As `new`, at a given SIMD level (one this CPU runs).
    pub fn with_simd(config: SamplerConfig, threads: usize, simd: Simd) -> Result<Self, KernelError> {
        config.check()?;
        let threads = if threads == 0 { default_threads() } else { threads };
        if threads > THREADS_MAX {
            return Err(KernelError::Shape {
                op: "sampler threads",
                detail: format!("{threads} outside 1..={THREADS_MAX}"),
            });
        }
        let vocab = config.vocab as usize;
        let own = FastRow::with_simd(vocab, simd).ok_or_else(|| KernelError::Shape {
            op: "sampler simd",
            detail: format!("this CPU has no {}", simd.name()),
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                epoch: 0,
                batch: None,
                busy: 0,
                panicked: false,
                shutdown: false,
            }),
            go: Condvar::new(),
            done: Condvar::new(),
            next_row: AtomicUsize::new(0),
        });
        let mut sampler = Self {
            config,
            threads,
            params: Vec::with_capacity(config.max_batch),
            own,
            shared,
            workers: Vec::with_capacity(threads - 1),
        };
        for t in 1..threads {
            let shared = Arc::clone(&sampler.shared);
            let row = FastRow::with_simd(vocab, simd).expect("the level was checked above");
            let handle = std::thread::Builder::new()
                .name(format!("sampler-{t}"))
                .spawn(move || pool_thread(shared, row))
                .map_err(|e| KernelError::Shape {
                    op: "sampler threads",
                    detail: format!("spawn: {e}"),
                })?;
            sampler.workers.push(handle);
        }
        Ok(sampler)
    }

    /// Threads that sample (the caller included).
    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn simd(&self) -> Simd {
        self.own.simd()
    }
}

impl TokenSampler for ParallelCpuSampler {
    fn config(&self) -> SamplerConfig {
        self.config
    }

    fn sample(&mut self, rows: &[SampleRow], out_ids: &mut [u32]) -> Result<(), KernelError> {
        self.config.check_call(rows, out_ids)?;
        self.params.clear();
        for row in rows {
            self.params.push(RowParams::from_row(row)?);
        }
        let batch = Batch {
            params: self.params.as_ptr(),
            out: out_ids.as_mut_ptr(),
            rows: rows.len(),
        };
        if self.workers.is_empty() || rows.len() < 2 {
            self.shared.next_row.store(0, Ordering::Relaxed);
            self.shared.work(batch, &mut self.own);
            return Ok(());
        }
        {
            let mut st = self.shared.lock();
            self.shared.next_row.store(0, Ordering::Relaxed);
            st.batch = Some(batch);
            st.busy = self.workers.len();
            st.epoch += 1;
            self.shared.go.notify_all();
        }
        {
            let _await = AwaitPool(&self.shared);
            self.shared.work(batch, &mut self.own);
        }
        let mut st = self.shared.lock();
        if std::mem::take(&mut st.panicked) {
            return Err(KernelError::InvalidRow("a sampler thread panicked".into()));
        }
        Ok(())
    }
}

impl Drop for ParallelCpuSampler {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.go.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
