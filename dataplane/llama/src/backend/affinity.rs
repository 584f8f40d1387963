//! Cache-aware routing (issue 14): a stream goes to the llama-server whose
//! KV cache most likely holds the longest prefix of its prompt, on the slot
//! that holds it, unless that server is too loaded.
//!
//! The facts are shared by all cores (`Shared::index`, `slot_busy`), so a
//! stream stolen by another core is routed by the same index: affinity
//! survives work stealing with nothing to carry.

use std::sync::atomic::Ordering;

use super::LlamaBackend;
use crate::prefix;
use crate::Route;

impl LlamaBackend {
    /// Hashes the stream's prompt (the chat messages' JSON for chat
    /// requests) into `self.hashes` when the policy needs it.
    pub(super) fn hash_prompt(&mut self, prompt: &[u8]) {
        self.hashes.clear();
        if self.cfg.route != Route::LeastOutstanding {
            prefix::block_hashes(prompt, &mut self.hashes);
        }
    }

    /// The server with the longest indexed prefix of `self.hashes` that has
    /// room and whose slot holding it is free, and that slot. `None` when no
    /// server holds any of it, when a least-loaded server holds as much,
    /// or when the best one's load is more than `prefix_load_factor` times
    /// the least-loaded one's (both counted +1): least-outstanding decides
    /// then.
    pub(super) fn prefix_choice(&self) -> Option<(usize, Option<u16>)> {
        if self.hashes.is_empty() {
            return None;
        }
        let limit = self.cfg.inflight_per_backend;
        let n = self.shared.len();
        // (server, matched blocks, slot, load): the longest match (ties:
        // the lower load), and among the least-loaded the longest match.
        type Pick = (usize, usize, Option<u16>, usize);
        let mut best: Option<Pick> = None;
        let mut least: Option<Pick> = None;
        for k in 0..n {
            let u = (self.round_robin + k) % n;
            let s = &self.shared[u];
            if !s.healthy.load(Ordering::Acquire) {
                continue;
            }
            let load = s.inflight.load(Ordering::Acquire);
            if load >= limit {
                continue;
            }
            let (mut matched, slot) = s.index.matched(&self.hashes);
            // llama-server reuses a cache only in the slot that holds it:
            // while another stream runs there, the prefix is no use here.
            if slot.is_some_and(|id| {
                s.slot_busy
                    .get(usize::from(id))
                    .is_some_and(|b| b.load(Ordering::Acquire))
            }) {
                matched = 0;
            }
            let pick = (u, matched, slot, load);
            if best.is_none_or(|(_, m, _, l)| matched > m || (matched == m && load < l)) {
                best = Some(pick);
            }
            if least.is_none_or(|(_, m, _, l)| load < l || (load == l && matched > m)) {
                least = Some(pick);
            }
        }
        let (u, matched, slot, load) = best?;
        let (lu, least_matched, least_slot, least_load) = least?;
        tracing::debug!(u, matched, ?slot, load, least_matched, least_load, "prefix choice");
        if matched == 0 {
            return None;
        }
        if load <= least_load {
            return Some((u, slot));
        }
        if least_matched == matched {
            return Some((lu, least_slot));
        }
        let too_loaded = (load + 1) as f32 > self.cfg.prefix_load_factor * (least_load + 1) as f32;
        (!too_loaded).then_some((u, slot))
    }

    /// The slot server `u`'s index names for the prompt (the least-loaded
    /// fallback still lands on the slot that holds what it can).
    pub(super) fn slot_hint(&self, u: usize) -> Option<u16> {
        if self.hashes.is_empty() {
            return None;
        }
        self.shared[u].index.matched(&self.hashes).1
    }

    /// Takes one of server `u`'s llama-server slots for a stream: `hint`
    /// when it is free, else the free slot given out longest ago (its cache
    /// is the least likely to be wanted). `None` when the slots are unknown
    /// or all taken by our streams (llama-server picks one then).
    pub(super) fn take_slot(&self, u: usize, hint: Option<u16>) -> Option<u16> {
        if self.cfg.route == Route::LeastOutstanding {
            return None;
        }
        let s = &self.shared[u];
        let known = s.slots_known.load(Ordering::Acquire);
        if known == 0 {
            return None;
        }
        let try_take = |id: usize| {
            s.slot_busy[id]
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        };
        let stamp = s.slot_clock.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
        let taken = match hint.map(usize::from) {
            Some(id) if id < known && try_take(id) => Some(id),
            _ => {
                // Oldest first; a few rounds, as another core may take the
                // chosen one between the look and the take.
                let mut got = None;
                for _ in 0..4 {
                    let oldest = (0..known)
                        .filter(|&id| !s.slot_busy[id].load(Ordering::Acquire))
                        .max_by_key(|&id| stamp.wrapping_sub(s.slot_used[id].load(Ordering::Relaxed)));
                    match oldest {
                        Some(id) if try_take(id) => {
                            got = Some(id);
                            break;
                        }
                        Some(_) => continue,
                        None => break,
                    }
                }
                got
            }
        }?;
        s.slot_used[taken].store(stamp, Ordering::Relaxed);
        Some(taken as u16)
    }

    /// Gives back the llama-server slot connection slot `i` held.
    pub(super) fn free_slot(&mut self, i: usize) {
        if let Some(id) = self.slots[i].id_slot.take() {
            let s = &self.shared[self.slots[i].upstream];
            s.slot_busy[usize::from(id)].store(false, Ordering::Release);
        }
    }

    /// Records the stream's prompt on server `u` (and slot).
    pub(super) fn remember_prompt(&self, u: usize, slot: Option<u16>) {
        if !self.hashes.is_empty() {
            self.shared[u].index.insert(&self.hashes, slot);
        }
    }

    /// Adds a finished stream's `timings` to its server's cache counters.
    pub(super) fn note_cache(&self, upstream: usize, split: Option<(u64, u64)>) {
        if let Some((cached, evaluated)) = split {
            let s = &self.shared[upstream];
            s.cache_n.fetch_add(cached, Ordering::Relaxed);
            s.prompt_n.fetch_add(evaluated, Ordering::Relaxed);
        }
    }
}
