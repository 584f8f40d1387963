//! Session affinity (issue 14, `--llama-route session`): a stream with a
//! session key goes to the server its key is pinned to, on the slot its
//! last turn used, while that server is healthy, has room and is not too
//! loaded; wherever it goes, the key is pinned there.
//!
//! The rule, in order:
//! 1. no key, or another policy: no pin (prefix, then least-outstanding);
//! 2. the key is pinned to server `u`, `u` is healthy, below its in-flight
//!    limit, and `in flight + 1` on `u` is at most `prefix_load_factor`
//!    times `in flight + 1` on the least-loaded healthy server: `u`, with
//!    the pinned slot as the hint (another free slot when that one is
//!    busy);
//! 3. otherwise (unknown key, `u` down, full or too loaded): routed as a
//!    request without a key.
//!
//! Wherever the stream is sent (`launch`: first, or again to another
//! server by a retry) its key is pinned there, so a conversation whose
//! server died moves once and stays on the new one.
//!
//! The table is shared by all cores (`crate::session::SessionTable`), so a
//! stolen stream keeps its session's server.

use std::sync::atomic::Ordering;

use super::LlamaBackend;
use crate::Route;

impl LlamaBackend {
    /// Hashes the stream's session key when the policy uses it.
    pub(super) fn hash_session(&mut self, key: Option<&str>) {
        self.session_hash = key
            .filter(|_| self.cfg.route == Route::Session)
            .map(|k| crate::prefix::session_hash(k.as_bytes()));
    }

    /// The server (and slot hint) the stream's session is pinned to, when
    /// rule 2 above holds.
    pub(super) fn session_choice(&self) -> Option<(usize, Option<u16>)> {
        let pin = self.sessions.get(self.session_hash?)?;
        let limit = self.cfg.inflight_per_backend;
        let s = self.shared.get(pin.server)?;
        if !s.healthy.load(Ordering::Acquire) {
            return None;
        }
        let load = s.inflight.load(Ordering::Acquire);
        if load >= limit {
            return None;
        }
        let least = self
            .shared
            .iter()
            .filter(|s| s.healthy.load(Ordering::Acquire))
            .map(|s| s.inflight.load(Ordering::Acquire))
            .min()
            .unwrap_or(load);
        let too_loaded = (load + 1) as f32 > self.cfg.prefix_load_factor * (least + 1) as f32;
        tracing::debug!(server = pin.server, slot = ?pin.slot, load, least, too_loaded, "session pin");
        (!too_loaded).then_some((pin.server, pin.slot))
    }
}
