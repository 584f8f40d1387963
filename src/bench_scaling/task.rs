//! The synthetic task: a service time drawn from the run's distribution,
//! served by waiting (a backend call) or spinning (CPU work), checking for
//! a cancel every slice.

use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    /// Every task takes `--task-us`.
    Constant,
    /// Exponential with mean `--task-us`.
    Exp,
    /// 80 % at half `--task-us`, 20 % at three times (mean `--task-us`).
    Bimodal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceMode {
    /// Sleep: a backend call (the CPU is free meanwhile).
    Wait,
    /// Busy loop: CPU-bound work.
    Spin,
}

/// Longest stretch served without looking at the cancel flag.
const CANCEL_CHECK_US: u64 = 200;

/// One task's work: its global index (unique across ranks) and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synthetic {
    pub index: u64,
    pub service_us: u32,
}

/// What a runner hands back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub index: u64,
    /// The result's place among its task's results (0, 1, ...; the last
    /// one ends the task).
    pub seq: u32,
    pub served_us: u32,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A hash of a task index, summed to check "each task ran exactly once".
pub fn index_hash(index: u64) -> u64 {
    splitmix(index ^ 0x5851_f42d_4c95_7f2d)
}

impl Synthetic {
    /// Task `index` of a run: the same on every rank and every run.
    pub fn new(index: u64, seed: u64, task_us: u32, service: Service) -> Self {
        let u = ((splitmix(seed ^ index.wrapping_mul(0x2545_f491_4f6c_dd1d)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let mean = task_us as f64;
        let us = match service {
            Service::Constant => mean,
            Service::Exp => -u.ln() * mean,
            Service::Bimodal if u < 0.8 => 0.5 * mean,
            Service::Bimodal => 3.0 * mean,
        };
        Self {
            index,
            service_us: us.round().clamp(0.0, u32::MAX as f64) as u32,
        }
    }

    /// Serves the task; stops early when `cancelled()` turns true. Wait
    /// counts wall time (a backend answers after that long whatever the
    /// CPU does); spin counts this thread's CPU time, so a task preempted
    /// on a full machine still does its whole work.
    pub fn serve(&self, mode: ServiceMode, cancelled: impl Fn() -> bool) -> Done {
        let start = Instant::now();
        let total = Duration::from_micros(self.service_us as u64);
        let clock = || match mode {
            ServiceMode::Wait => start.elapsed(),
            ServiceMode::Spin => crate::thread_cpu::own_thread_cpu(),
        };
        let begin = clock();
        while clock().saturating_sub(begin) < total && !cancelled() {
            let left = total.saturating_sub(clock().saturating_sub(begin));
            let slice = left.min(Duration::from_micros(CANCEL_CHECK_US));
            match mode {
                ServiceMode::Wait => std::thread::sleep(slice),
                ServiceMode::Spin => {
                    let until = crate::thread_cpu::own_thread_cpu() + slice;
                    while crate::thread_cpu::own_thread_cpu() < until {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        Done {
            index: self.index,
            seq: 0,
            served_us: start.elapsed().as_micros().min(u32::MAX as u128) as u32,
        }
    }
}

impl cnse_sched::WirePayload for Synthetic {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.service_us.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; 12] = b.try_into().ok()?;
        Some(Self {
            index: u64::from_le_bytes(b[..8].try_into().ok()?),
            service_us: u32::from_le_bytes(b[8..].try_into().ok()?),
        })
    }
}

impl cnse_sched::WirePayload for Done {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.index.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.served_us.to_le_bytes());
    }
    fn decode(b: &[u8]) -> Option<Self> {
        let b: &[u8; 16] = b.try_into().ok()?;
        Some(Self {
            index: u64::from_le_bytes(b[..8].try_into().ok()?),
            seq: u32::from_le_bytes(b[8..12].try_into().ok()?),
            served_us: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cnse_sched::WirePayload;

    #[test]
    fn distributions_keep_their_mean() {
        for service in [Service::Constant, Service::Exp, Service::Bimodal] {
            let n = 20_000u64;
            let sum: u64 = (0..n)
                .map(|i| Synthetic::new(i, 7, 1000, service).service_us as u64)
                .sum();
            let mean = sum as f64 / n as f64;
            assert!((mean - 1000.0).abs() < 30.0, "{service:?}: mean {mean}");
        }
    }

    #[test]
    fn payloads_round_trip_and_reject_bad_bytes() {
        let s = Synthetic::new(42, 1, 100, Service::Exp);
        let mut b = Vec::new();
        s.encode(&mut b);
        assert_eq!(Synthetic::decode(&b), Some(s));
        assert_eq!(Synthetic::decode(&b[..5]), None);
    }

    #[test]
    fn serve_stops_on_cancel() {
        let s = Synthetic {
            index: 1,
            service_us: 1_000_000,
        };
        let d = s.serve(ServiceMode::Wait, || true);
        assert!(d.served_us < 1_000);
    }
}
