//! The peer the HTTP front is measured against (issue 12): an OpenAI-style
//! streaming completions server on hyper/axum and tokio, as most Rust
//! inference gateways are built, serving the same synthetic tokens as
//! cnse-dp's zero-delay backend (`expected_text`: same prompt and seed,
//! same text) in the same event shape: one event with the text and the
//! finish reason, then `data: [DONE]` (cnse-dp coalesces the tokens
//! produced in one loop turn into one event, and the last with the finish;
//! so does this).
//!
//! ```sh
//! cargo bench --bench axum_peer -- --listen 127.0.0.1:7980 [--cpu 0]
//! cnse-dp bench --mode http --addr 127.0.0.1:7980 --server-pid PID ...
//! ```
//!
//! One tokio worker thread (a current-thread runtime), so it is compared
//! per server core.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, Sse};
use axum::routing::post;
use axum::{Json, Router};
use cnse_backend::synthetic::expected_text;
use futures_util::stream::{self, Stream};
use serde::Deserialize;

#[derive(Deserialize)]
struct Completion {
    prompt: String,
    #[serde(default = "sixteen")]
    max_tokens: u32,
    #[serde(default)]
    seed: u64,
}

fn sixteen() -> u32 {
    16
}

fn chunk(id: u64, created: u64, text: &str, finish: Option<&str>) -> String {
    let finish = finish.map_or("null".to_string(), |f| format!("\"{f}\""));
    format!(
        "{{\"id\":\"cmpl-{id}\",\"object\":\"text_completion\",\"created\":{created},\"model\":\"cnse-synthetic\",\"choices\":[{{\"index\":0,\"text\":{},\"logprobs\":null,\"finish_reason\":{finish}}}]}}",
        serde_json::to_string(text).expect("a string serializes")
    )
}

async fn completions(Json(req): Json<Completion>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let text = String::from_utf8_lossy(&expected_text(&req.prompt, req.seed, req.max_tokens)).into_owned();
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = req.seed;
    let events = vec![
        Ok(Event::default().data(chunk(id, created, &text, Some("length")))),
        Ok(Event::default().data("[DONE]")),
    ];
    Sse::new(stream::iter(events))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = arg(&args, "--listen") else {
        eprintln!("axum_peer: give --listen ADDR to serve (see the file's header)");
        return;
    };
    if let Some(cpu) = arg(&args, "--cpu") {
        let _ = cnse_ring::pin_current_thread_to(cpu.parse().expect("--cpu N"));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        use axum::serve::ListenerExt as _;
        let listener = tokio::net::TcpListener::bind(&listen).await.expect("bind");
        println!("listening on {}", listener.local_addr().expect("bound"));
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = Router::new().route("/v1/completions", post(completions));
        axum::serve(listener, app).await.expect("serve");
    });
}
