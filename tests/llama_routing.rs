//! Issue 14: cache-aware routing in front of three real llama-servers
//! (`CNSE_LLAMA_URLS=url1,url2,url3`, started by scripts/test.sh): the
//! turns of one conversation land on one server and slot, and its cache
//! serves their prompts; a refused connection is retried on another server
//! unseen by the client. Skipped (with a message) without the URLs, unless
//! `CNSE_REQUIRE_SERVICES=1`.

mod common;
mod llama_common;

use std::collections::HashMap;
use std::sync::Mutex;

use common::{Params, Server};
use llama_common::{http, prompt_counters, skip};

/// CPU inference on 2 cores: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn urls() -> Option<Vec<String>> {
    match std::env::var("CNSE_LLAMA_URLS") {
        Ok(v) if v.split(',').count() >= 3 => Some(v.split(',').map(str::to_string).collect()),
        _ => skip("CNSE_LLAMA_URLS (three llama-server URLs, comma separated) is not set"),
    }
}

fn greedy(n: u32) -> Params {
    Params {
        max_tokens: n,
        temperature: 0.0,
        ..Params::default()
    }
}

/// Each slot's last task id (`/slots`): the slot that served a request is
/// the one whose task changed.
fn slot_tasks(url: &str) -> HashMap<u64, u64> {
    let (status, body) = http(url, "GET", "/slots", "");
    assert_eq!(status, 200, "{url}/slots: {body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| (s["id"].as_u64().unwrap(), s["id_task"].as_u64().unwrap_or(0)))
        .collect()
}

#[test]
fn issue14_the_turns_of_one_conversation_stay_on_one_llama_server_slot_and_hit_its_cache() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(urls) = urls() else { return };
    let server = Server::start(&["--backend", "llama", "--llama-url", &urls.join(","), "--threads", "2"]);
    let mut c = server.client();
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let system = format!(
        "[{nonce}] You are a terse assistant. {}\n",
        "Answer in one short sentence, stay polite, and never use lists. ".repeat(8)
    );
    let mut history = String::new();
    let mut used = Vec::new();
    for (turn, q) in ["Name a red fruit.", "Name a yellow one.", "And a green one?"]
        .iter()
        .enumerate()
    {
        let before: Vec<_> = urls.iter().map(|u| (prompt_counters(u), slot_tasks(u))).collect();
        let prompt = format!("{system}{history}User: {q}\nAssistant:");
        let g = c.generate(turn as u64 + 1, 0, &greedy(8), &prompt, |_, _| {}).unwrap();
        history.push_str(&format!("User: {q}\nAssistant:{}\n", String::from_utf8_lossy(&g.text)));
        // The server whose counters moved, and its slot whose task changed.
        let mut moved = Vec::new();
        for (k, u) in urls.iter().enumerate() {
            let ((e0, c0), ref t0) = before[k];
            let (e1, c1) = prompt_counters(u);
            if (e1, c1) != (e0, c0) {
                let t1 = slot_tasks(u);
                let slot = t1.iter().find(|(id, t)| t0.get(id) != Some(t)).map(|(id, _)| *id);
                moved.push((k, slot, e1 - e0, c1 - c0));
            }
        }
        assert_eq!(moved.len(), 1, "turn {}: one server served it: {moved:?}", turn + 1);
        let (k, slot, evaluated, cached) = moved[0];
        eprintln!(
            "turn {}: server {k} slot {slot:?}: {cached} prompt tokens from the cache, {evaluated} evaluated",
            turn + 1
        );
        if turn > 0 {
            assert!(
                cached * 100 >= (cached + evaluated) * 80,
                "turn {}: at least 80 % of the prompt from the cache: {cached} cached, {evaluated} evaluated",
                turn + 1
            );
        }
        used.push((k, slot));
    }
    assert!(
        used.iter().all(|u| *u == used[0]),
        "every turn on one server and slot: {used:?}"
    );
}

#[test]
fn issue14_a_refused_connection_is_retried_on_another_server_unseen_by_the_client() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(urls) = urls() else { return };
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    // The dead server first: least-outstanding tries it first.
    let list = format!("{dead},{}", urls[0]);
    let server = Server::start(&[
        "--backend",
        "llama",
        "--llama-url",
        &list,
        "--llama-route",
        "least-outstanding",
        "--threads",
        "1",
    ]);
    let mut c = server.client();
    let g = c
        .generate(1, 0, &greedy(8), "The capital of France is", |_, _| {})
        .unwrap();
    assert!(g.tokens >= 1 && g.tokens == g.end_tokens);
}
