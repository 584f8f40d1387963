//! Which threads of this process kept a core busy during a measured region
//! (issue 15: "at most 2 host threads busy"). Per-thread CPU time comes from
//! `/proc/self/task/TID/schedstat` (nanoseconds on a CPU). The loads start
//! and join their worker threads inside the region, so a sampler thread
//! reads every task's counter every `SAMPLE_MS` and keeps the last value
//! seen; a thread that exits loses at most its last period. The sampler
//! leaves itself out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Sampling period of the sampler thread.
const SAMPLE_MS: u64 = 1;
/// A thread is busy when it ran on a CPU for at least this share of the
/// region's wall time.
pub(crate) const BUSY_SHARE: f64 = 0.25;

/// CPU nanoseconds of every task of this process, by thread id.
fn snapshot(skip: Option<i32>, into: &mut HashMap<i32, u64>) {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for e in dir.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if Some(tid) == skip {
            continue;
        }
        let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) else {
            continue; // the thread exited between the listing and the read
        };
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()) {
            into.insert(tid, ns);
        }
    }
}

/// A running sampler; `finish` stops it and returns the region's figures.
pub(crate) struct ThreadCpu {
    start: Instant,
    base: HashMap<i32, u64>,
    stop: Arc<AtomicBool>,
    sampler: JoinHandle<HashMap<i32, u64>>,
}

/// Per-thread CPU time over one region.
pub(crate) struct ThreadUse {
    pub(crate) wall_s: f64,
    /// CPU seconds of each thread that ran in the region, largest first.
    pub(crate) cpu_s: Vec<f64>,
}

impl ThreadUse {
    /// Threads that ran at least `BUSY_SHARE` of the wall time.
    pub(crate) fn busy(&self) -> usize {
        self.cpu_s.iter().filter(|&&c| c >= BUSY_SHARE * self.wall_s).count()
    }

    /// CPU time of all threads over wall time (cores kept busy).
    pub(crate) fn cores(&self) -> f64 {
        self.cpu_s.iter().sum::<f64>() / self.wall_s
    }

    /// The busiest threads' shares of the wall time, e.g. "0.98 0.97 0.12".
    pub(crate) fn top(&self, n: usize) -> String {
        let v: Vec<String> = self
            .cpu_s
            .iter()
            .take(n)
            .map(|c| format!("{:.2}", c / self.wall_s))
            .collect();
        v.join(" ")
    }
}

impl ThreadCpu {
    pub(crate) fn start() -> ThreadCpu {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let sampler = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            let _ = tx.send(me);
            let mut last = HashMap::new();
            while !s.load(Ordering::Acquire) {
                snapshot(Some(me), &mut last);
                std::thread::sleep(std::time::Duration::from_millis(SAMPLE_MS));
            }
            snapshot(Some(me), &mut last);
            last
        });
        let me = rx.recv().ok();
        let mut base = HashMap::new();
        snapshot(me, &mut base);
        ThreadCpu {
            start: Instant::now(),
            base,
            stop,
            sampler,
        }
    }

    pub(crate) fn finish(self) -> ThreadUse {
        let wall_s = self.start.elapsed().as_secs_f64();
        self.stop.store(true, Ordering::Release);
        let last = self.sampler.join().unwrap_or_default();
        let mut cpu_s: Vec<f64> = last
            .iter()
            .map(|(tid, &ns)| ns.saturating_sub(self.base.get(tid).copied().unwrap_or(0)) as f64 / 1e9)
            .filter(|&c| c > 0.0)
            .collect();
        cpu_s.sort_by(|a, b| b.total_cmp(a));
        ThreadUse { wall_s, cpu_s }
    }
}

/// CPU time the calling thread has used.
pub(crate) fn own_thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration;
    // CLOCK_THREAD_CPUTIME_ID exists on every Linux this runs on.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spinning_thread_is_busy_and_a_sleeping_one_is_not() {
        let t = ThreadCpu::start();
        // The spinner runs until it has had 200 ms of CPU, however long a
        // busy machine takes to give it that (a fixed 200 ms of wall time
        // gave it under 100 ms of CPU while other tests ran beside it).
        let spin = std::thread::spawn(|| {
            let mut x = 0u64;
            while own_thread_cpu() < std::time::Duration::from_millis(200) {
                for _ in 0..1000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
        });
        let sleep = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        spin.join().unwrap();
        sleep.join().unwrap();
        let u = t.finish();
        // The spinner ran most of the region (on a shared 2-core box it
        // may be descheduled now and then); nothing else did.
        assert!(u.busy() >= 1, "busy {} of {:?} over {} s", u.busy(), u.cpu_s, u.wall_s);
        assert!(u.busy() <= 2, "busy {} of {:?} over {} s", u.busy(), u.cpu_s, u.wall_s);
        assert!(u.cpu_s[0] > 0.1, "{:?}", u.cpu_s);
    }
}
