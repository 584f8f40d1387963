//! The llama-server backend as `serve` builds it from its `--llama-*`
//! arguments: the gateway's factory, and the servers' slots learnt at
//! start-up (they bound the spares and tell where requests would wait).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use cnse_backend::BackendFactory;

use crate::serve::{Args, OnOff};

/// The llama backend of `--llama-url`; warns on stderr about servers whose
/// slots are unknown or fewer than `--llama-inflight` when routing uses
/// their caches.
pub fn llama_factory(a: &Args) -> anyhow::Result<Arc<dyn BackendFactory>> {
    if a.llama_url.is_empty() {
        bail!("--backend llama needs --llama-url URL[,URL...]");
    }
    let factory = cnse_llama::LlamaFactory::new(cnse_llama::LlamaConfig {
        urls: a.llama_url.clone(),
        inflight_per_backend: a.llama_inflight,
        route: a.llama_route,
        prefix_load_factor: a.llama_prefix_load_factor,
        prefix_entries: a.llama_prefix_entries,
        session_entries: a.llama_session_entries,
        retries_max: a.llama_retries,
        spare_conns: a.llama_spare_conns.unwrap_or(a.llama_inflight),
        spares_max: a.llama_spares_max,
        failover: a.llama_failover == OnOff::On,
        ..Default::default()
    })
    .context("--llama-url")?;
    // The slots also bound the spares (docs/LLAMA.md, "Spares").
    let slots = factory.learn_slots();
    if a.llama_route.uses_cache() {
        for (url, &n) in a.llama_url.iter().zip(&slots) {
            if n == 0 {
                eprintln!("llama-server {url}: slots unknown (GET /slots did not answer): requests go without id_slot");
            } else if n < a.llama_inflight {
                eprintln!(
                    "llama-server {url} has {n} slots, below --llama-inflight {}: some requests wait inside it",
                    a.llama_inflight
                );
            }
        }
    }
    Ok(Arc::new(factory))
}

/// The model the first llama-server lists, if it answers within 2 s.
pub fn served_model_name(a: &Args) -> Option<String> {
    let url = a.llama_url.first()?;
    cnse_llama::served_model(url, Duration::from_secs(2))
}
