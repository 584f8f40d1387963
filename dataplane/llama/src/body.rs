//! The JSON body of `POST /completion`: the CNSE parameter block mapped to
//! llama-server's sampling fields.
//!
//! | CNSE          | llama-server  | note |
//! |---------------|---------------|------|
//! | prompt        | `prompt`      | |
//! | `max_tokens`  | `n_predict`   | |
//! | `temperature` | `temperature` | 0 is greedy in both |
//! | `top_p`       | `top_p`       | 1 disables in both |
//! | `top_k`       | `top_k`       | 0 disables in both (clamped to i32) |
//! | `seed`        | `seed`        | u32 in llama-server: see [`seed_u32`] |
//! | —             | `min_p: 0`    | the CNSE block is the whole sampling spec, so llama-server's own default filter (0.05) is off |
//! | —             | `stream: true`, `cache_prompt` (config) | |
//!
//! `response_fields` trims the last event to what the backend reads
//! (llama-server otherwise echoes the prompt and all settings in it, which
//! would make the longest line grow with the prompt).

use cnse_proto::Params;
use serde::Serialize;

/// The sampling fields both request bodies carry.
#[derive(Serialize)]
struct Sampling {
    temperature: f32,
    top_p: f32,
    top_k: i32,
    min_p: f32,
    seed: u32,
    stream: bool,
    cache_prompt: bool,
}

impl Sampling {
    fn of(params: &Params, cache_prompt: bool) -> Sampling {
        Sampling {
            temperature: params.temperature,
            top_p: params.top_p,
            top_k: i32::try_from(params.top_k).unwrap_or(i32::MAX),
            min_p: 0.0,
            seed: seed_u32(params.seed),
            stream: true,
            cache_prompt,
        }
    }
}

#[derive(Serialize)]
struct Completion<'a> {
    prompt: &'a str,
    n_predict: u32,
    #[serde(flatten)]
    sampling: Sampling,
    response_fields: [&'static str; 7],
}

const RESPONSE_FIELDS: [&str; 7] = [
    "content",
    "tokens",
    "stop",
    "stop_type",
    "stopping_word",
    "tokens_predicted",
    "timings",
];

/// llama-server reads `seed` as a u32 where 0xFFFFFFFF means "random". A
/// CNSE seed always means a fixed seed, so seeds below 2^32 - 1 pass as they
/// are and larger ones are folded (high half XOR low half) into the range
/// below 2^32 - 1.
pub fn seed_u32(seed: u64) -> u32 {
    if seed < u64::from(u32::MAX) {
        return seed as u32;
    }
    let folded = (seed as u32) ^ ((seed >> 32) as u32);
    if folded == u32::MAX {
        u32::MAX - 1
    } else {
        folded
    }
}

/// Writes the streaming request body for `params` and `prompt` into `out`
/// (appended; the caller clears it).
pub fn write_completion_body(out: &mut Vec<u8>, params: &Params, prompt: &str, cache_prompt: bool) {
    let body = Completion {
        prompt,
        n_predict: params.max_tokens,
        sampling: Sampling::of(params, cache_prompt),
        response_fields: RESPONSE_FIELDS,
    };
    serde_json::to_writer(out, &body).expect("serializing a plain struct into a Vec cannot fail");
}

#[derive(Serialize)]
struct ChatRest {
    max_tokens: u32,
    #[serde(flatten)]
    sampling: Sampling,
}

/// Writes the streaming body of `POST /v1/chat/completions` (llama-server
/// applies the model's chat template): `messages_json` (a JSON array the
/// HTTP front checked and wrote) and the same sampling fields as
/// [`write_completion_body`].
pub fn write_chat_body(out: &mut Vec<u8>, params: &Params, messages_json: &str, cache_prompt: bool) {
    out.extend_from_slice(b"{\"messages\":");
    out.extend_from_slice(messages_json.as_bytes());
    out.push(b',');
    let rest = ChatRest {
        max_tokens: params.max_tokens,
        sampling: Sampling::of(params, cache_prompt),
    };
    let at = out.len();
    serde_json::to_writer(&mut *out, &rest).expect("serializing a plain struct into a Vec cannot fail");
    // `{"messages":[...],` + `{"max_tokens":...}` without its `{`.
    out.remove(at);
}

/// Adds `"id_slot": id` to a body written by [`write_completion_body`] or
/// [`write_chat_body`] (a JSON object): llama-server runs the request on
/// that slot, whose KV cache holds the prompt's prefix.
pub fn append_id_slot(out: &mut Vec<u8>, id: u16) {
    use std::io::Write;
    assert_eq!(out.pop(), Some(b'}'), "a body is one JSON object");
    write!(out, ",\"id_slot\":{id}}}").expect("writing into a Vec cannot fail");
}

/// The streaming request body as a string (tests, the direct client).
pub fn completion_body(params: &Params, prompt: &str, cache_prompt: bool) -> String {
    let mut v = Vec::with_capacity(prompt.len() + 256);
    write_completion_body(&mut v, params, prompt, cache_prompt);
    String::from_utf8(v).expect("serde_json writes UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_params() {
        let p = Params {
            max_tokens: 7,
            temperature: 0.5,
            top_p: 0.9,
            top_k: 40,
            seed: 42,
            priority: 3,
        };
        let v: serde_json::Value = serde_json::from_str(&completion_body(&p, "a \"q\"\n", false)).unwrap();
        assert_eq!(v["prompt"], "a \"q\"\n");
        assert_eq!(v["n_predict"], 7);
        assert_eq!(v["temperature"], 0.5);
        assert_eq!(v["top_k"], 40);
        assert_eq!(v["seed"], 42);
        assert_eq!(v["stream"], true);
        assert_eq!(v["cache_prompt"], false);
        assert!((v["top_p"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn chat_bodies_carry_the_messages() {
        let mut out = Vec::new();
        write_chat_body(
            &mut out,
            &Params::default(),
            r#"[{"role":"user","content":"hi"}]"#,
            true,
        );
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["messages"][0]["content"], "hi");
        assert_eq!(
            (v["max_tokens"].as_u64(), v["stream"].as_bool()),
            (Some(16), Some(true))
        );
    }

    #[test]
    fn id_slot_is_appended() {
        let mut out = Vec::new();
        write_completion_body(&mut out, &Params::default(), "hi", true);
        append_id_slot(&mut out, 0);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["id_slot"].as_u64(), v["cache_prompt"].as_bool()),
            (Some(0), Some(true))
        );
        let mut out = Vec::new();
        write_chat_body(&mut out, &Params::default(), "[]", true);
        append_id_slot(&mut out, 4094);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["id_slot"].as_u64(), Some(4094));
    }

    #[test]
    fn seeds_never_mean_random() {
        assert_eq!(seed_u32(0), 0);
        assert_eq!(seed_u32(u64::from(u32::MAX) - 1), u32::MAX - 1);
        assert_ne!(seed_u32(u64::from(u32::MAX)), u32::MAX);
        assert_ne!(seed_u32(u64::MAX), u32::MAX);
        assert_ne!(seed_u32(1 << 40), seed_u32(1 << 41));
    }
}
