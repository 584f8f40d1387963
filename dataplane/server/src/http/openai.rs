//! The OpenAI request bodies this front understands, and the JSON it
//! writes back: completion and chat-completion objects, their streamed
//! chunks (server-sent events), the model list and error bodies. Output is
//! written straight into a connection's buffer, strings escaped in place.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;

use cnse_proto::Params;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Most stop sequences a request may give (as OpenAI).
pub const STOPS_MAX: usize = 4;
/// Longest stop sequence accepted, in bytes.
pub const STOP_BYTES_MAX: usize = 256;

/// `prompt` and `stop`: one string or an array of them. A plain string
/// without escapes is borrowed from the body (the hot path: no copy, no
/// allocation); the visitor reads either shape in one pass (serde's
/// `untagged` would buffer the value first and try each shape).
enum OneOrMany<'a> {
    One(Cow<'a, str>),
    Many(Vec<String>),
}

impl<'de: 'a, 'a> Deserialize<'de> for OneOrMany<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = OneOrMany<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(OneOrMany::One(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(OneOrMany::One(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(OneOrMany::One(Cow::Owned(v)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    v.push(s);
                }
                Ok(OneOrMany::Many(v))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize, Serialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

#[derive(Deserialize, Serialize)]
struct Message {
    role: String,
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct Body<'a> {
    #[serde(borrow)]
    prompt: Option<OneOrMany<'a>>,
    messages: Option<Vec<Message>>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    seed: Option<u64>,
    #[serde(borrow)]
    stop: Option<OneOrMany<'a>>,
    n: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
}

/// A request body turned into what the session schedules.
pub struct Parsed {
    pub params: Params,
    pub stream: bool,
    pub include_usage: bool,
    pub stops: Vec<String>,
    /// Chat: the messages as a JSON array, for backends that apply the
    /// model's own chat template.
    pub messages: Option<String>,
}

/// Reads a completions (`chat` false) or chat-completions body; the prompt
/// (for chat: the messages through the template) goes into `prompt`.
/// `Err` is the message of a 400.
pub fn parse(body: &[u8], chat: bool, max_tokens_limit: u32, prompt: &mut String) -> Result<Parsed, String> {
    let b: Body = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    prompt.clear();
    let mut messages_json = None;
    if chat {
        let messages = b.messages.ok_or("`messages` is required")?;
        if messages.is_empty() {
            return Err("`messages` must not be empty".into());
        }
        template(&messages, prompt)?;
        messages_json = Some(serde_json::to_string(&messages).map_err(|e| format!("messages: {e}"))?);
    } else {
        match b.prompt.ok_or("`prompt` is required")? {
            OneOrMany::One(p) => prompt.push_str(&p),
            OneOrMany::Many(v) if v.len() == 1 => prompt.push_str(&v[0]),
            OneOrMany::Many(_) => return Err("`prompt` must be one string (n = 1)".into()),
        }
    }
    if b.n.is_some_and(|n| n != 1) {
        return Err("only `n` = 1 is supported".into());
    }
    let max_tokens = b.max_completion_tokens.or(b.max_tokens).unwrap_or(16);
    if max_tokens == 0 || max_tokens > max_tokens_limit {
        return Err(format!("`max_tokens` must be in 1..={max_tokens_limit}"));
    }
    let temperature = b.temperature.unwrap_or(1.0);
    if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
        return Err("`temperature` must be in [0, 2]".into());
    }
    let top_p = b.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err("`top_p` must be in (0, 1]".into());
    }
    let stops = match b.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.into_owned()],
        Some(OneOrMany::Many(v)) => v,
    };
    if stops.len() > STOPS_MAX {
        return Err(format!("at most {STOPS_MAX} `stop` sequences"));
    }
    if stops.iter().any(|s| s.is_empty() || s.len() > STOP_BYTES_MAX) {
        return Err(format!("`stop` sequences must be 1..={STOP_BYTES_MAX} bytes"));
    }
    Ok(Parsed {
        params: Params {
            max_tokens,
            temperature,
            top_p,
            top_k: b.top_k.unwrap_or(0),
            seed: b.seed.unwrap_or(0),
            priority: 0,
        },
        stream: b.stream.unwrap_or(false),
        include_usage: b.stream_options.unwrap_or_default().include_usage.unwrap_or(false),
        stops,
        messages: messages_json,
    })
}

/// The synthetic backend's chat template (docs/HTTP.md): each message as
/// `<|ROLE|>\nCONTENT\n`, then `<|assistant|>\n` for the reply.
fn template(messages: &[Message], out: &mut String) -> Result<(), String> {
    for m in messages {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant" | "tool") {
            return Err(format!("unknown message role `{}`", m.role));
        }
        out.push_str("<|");
        out.push_str(&m.role);
        out.push_str("|>\n");
        match &m.content {
            None => {}
            Some(Content::Text(t)) => out.push_str(t),
            Some(Content::Parts(parts)) => {
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => out.push_str(t),
                        _ => return Err(format!("message content part `{}` is not supported", p.kind)),
                    }
                }
            }
        }
        out.push('\n');
    }
    out.push_str("<|assistant|>\n");
    Ok(())
}

/// Writes `s` as a JSON string literal (quotes included). `s` is UTF-8;
/// only `"`, `\` and control characters need escapes.
pub fn json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    // Most text needs no escape: one branch-free scan, one copy.
    if !s
        .iter()
        .fold(false, |any, &b| any | (b < 0x20) | (b == b'"') | (b == b'\\'))
    {
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&s[start..i]);
                let _ = write!(out, "\\u{:04x}", b);
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// The largest prefix of `b` that ends on a UTF-8 character boundary (a
/// token may end inside a character; the rest waits for the next token).
pub fn utf8_prefix(b: &[u8]) -> usize {
    match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        // Invalid bytes (not just cut short): pass them through; the JSON
        // writer keeps them and the client sees what the model made.
        Err(_) => b.len(),
    }
}

/// What an event or body describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Completion,
    Chat,
}

/// Fields shared by every object of one response.
pub struct Ident<'a> {
    pub kind: Kind,
    pub id: u64,
    pub created: u64,
    pub model: &'a str,
}

/// Appends `n` in decimal (every chunk has two numbers: `core::fmt` was a
/// tenth of the HTTP front's CPU).
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

fn head(out: &mut Vec<u8>, i: &Ident, object: &str) {
    out.extend_from_slice(match i.kind {
        Kind::Completion => b"{\"id\":\"cmpl-",
        Kind::Chat => b"{\"id\":\"chatcmpl-",
    });
    push_u64(out, i.id);
    out.extend_from_slice(b"\",\"object\":\"");
    out.extend_from_slice(object.as_bytes());
    out.extend_from_slice(b"\",\"created\":");
    push_u64(out, i.created);
    out.extend_from_slice(b",\"model\":");
    json_str(out, i.model.as_bytes());
}

/// `,"logprobs":null,"finish_reason":REASON` (`null` while streaming).
fn finish_field(out: &mut Vec<u8>, reason: Option<&str>) {
    out.extend_from_slice(b",\"logprobs\":null,\"finish_reason\":");
    match reason {
        Some(r) => {
            out.push(b'"');
            out.extend_from_slice(r.as_bytes());
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
}

/// One streamed chunk: `text` (may be empty) and, on the last, the finish
/// reason. `first` adds the chat role.
pub fn chunk(out: &mut Vec<u8>, i: &Ident, text: &[u8], first: bool, finish: Option<&str>) {
    match i.kind {
        Kind::Completion => {
            head(out, i, "text_completion");
            out.extend_from_slice(b",\"choices\":[{\"index\":0,\"text\":");
            json_str(out, text);
            finish_field(out, finish);
            out.extend_from_slice(b"}]}");
        }
        Kind::Chat => {
            head(out, i, "chat.completion.chunk");
            out.extend_from_slice(b",\"choices\":[{\"index\":0,\"delta\":{");
            let content = !text.is_empty() || finish.is_none();
            if first {
                out.extend_from_slice(b"\"role\":\"assistant\"");
                if content {
                    out.push(b',');
                }
            }
            if content {
                out.extend_from_slice(b"\"content\":");
                json_str(out, text);
            }
            out.push(b'}');
            finish_field(out, finish);
            out.extend_from_slice(b"}]}");
        }
    }
}

/// The usage-only chunk of `stream_options.include_usage`.
pub fn usage_chunk(out: &mut Vec<u8>, i: &Ident, prompt_tokens: u64, completion_tokens: u64) {
    let object = match i.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion.chunk",
    };
    head(out, i, object);
    out.extend_from_slice(b",\"choices\":[],");
    usage(out, prompt_tokens, completion_tokens);
    out.push(b'}');
}

fn usage(out: &mut Vec<u8>, prompt_tokens: u64, completion_tokens: u64) {
    out.extend_from_slice(b"\"usage\":{\"prompt_tokens\":");
    push_u64(out, prompt_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    push_u64(out, completion_tokens);
    out.extend_from_slice(b",\"total_tokens\":");
    push_u64(out, prompt_tokens + completion_tokens);
    out.push(b'}');
}

/// The whole (non-streamed) response object.
pub fn full(out: &mut Vec<u8>, i: &Ident, text: &[u8], finish: &str, prompt_tokens: u64, completion_tokens: u64) {
    match i.kind {
        Kind::Completion => {
            head(out, i, "text_completion");
            out.extend_from_slice(b",\"choices\":[{\"index\":0,\"text\":");
            json_str(out, text);
            finish_field(out, Some(finish));
            out.extend_from_slice(b"}],");
        }
        Kind::Chat => {
            head(out, i, "chat.completion");
            out.extend_from_slice(b",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":");
            json_str(out, text);
            out.push(b'}');
            finish_field(out, Some(finish));
            out.extend_from_slice(b"}],");
        }
    }
    usage(out, prompt_tokens, completion_tokens);
    out.push(b'}');
}

/// The OpenAI error object for `status`.
pub fn error_body(out: &mut Vec<u8>, status: u16, message: &str) {
    let kind = match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    out.extend_from_slice(b"{\"error\":{\"message\":");
    json_str(out, message.as_bytes());
    let _ = write!(out, ",\"type\":\"{kind}\",\"param\":null,\"code\":{status}}}}}");
}

/// `GET /v1/models`.
/// `GET /v1/models`: the served model, then the model store's names
/// (`owned_by: "cnse-dp store"`).
pub fn models(out: &mut Vec<u8>, model: &str, store_names: &[String], created: u64) {
    out.extend_from_slice(b"{\"object\":\"list\",\"data\":[");
    for (i, (id, owner)) in std::iter::once((model, "cnse-dp"))
        .chain(store_names.iter().map(|n| (n.as_str(), "cnse-dp store")))
        .enumerate()
    {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"id\":");
        json_str(out, id.as_bytes());
        let _ = write!(
            out,
            ",\"object\":\"model\",\"created\":{created},\"owned_by\":\"{owner}\"}}"
        );
    }
    out.extend_from_slice(b"]}");
}

/// Prompt tokens as usage reports them unless the backend counts them
/// (llama-server does, `Sink::prompt_tokens`): the synthetic model's
/// reading of text (`cnse_backend::synthetic::token_count`).
pub fn prompt_tokens(prompt: &str) -> u64 {
    cnse_backend::synthetic::token_count(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_escaped_and_utf8_cuts_wait() {
        let mut o = Vec::new();
        json_str(&mut o, "a\"b\\c\nd\u{1}é".as_bytes());
        assert_eq!(String::from_utf8(o.clone()).unwrap(), r#""a\"b\\c\nd\u0001é""#);
        let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
        assert_eq!(v, "a\"b\\c\nd\u{1}é");
        let e = "é".as_bytes();
        assert_eq!(utf8_prefix(&[b'x', e[0]]), 1);
        assert_eq!(utf8_prefix(&[b'x', e[0], e[1]]), 3);
    }

    #[test]
    fn bodies_parse_and_bad_ones_say_why() {
        let mut p = String::new();
        let r = parse(
            br#"{"prompt":"hi","max_tokens":5,"stream":true,"stop":["x","y"],"seed":7}"#,
            false,
            100,
            &mut p,
        )
        .unwrap();
        assert_eq!(
            (p.as_str(), r.params.max_tokens, r.stream, r.stops.len(), r.params.seed),
            ("hi", 5, true, 2, 7)
        );
        // Escapes in the prompt (not borrowable), a one-element array, a
        // single stop string.
        parse(br#"{"prompt":"a\"b\u00e9","stop":"\n"}"#, false, 100, &mut p).unwrap();
        assert_eq!(p, "a\"bé");
        let r = parse(br#"{"prompt":["only"],"stop":"\n"}"#, false, 100, &mut p).unwrap();
        assert_eq!((p.as_str(), r.stops), ("only", vec!["\n".to_string()]));
        let r = parse(br#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stream_options":{"include_usage":true}}"#, true, 100, &mut p).unwrap();
        assert_eq!(p, "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n");
        assert!(r.include_usage && !r.stream);
        for (body, chat) in [
            (&br#"{"prompt":"x","max_tokens":0}"#[..], false),
            (br#"{"prompt":"x","max_tokens":101}"#, false),
            (br#"{"prompt":"x","n":2}"#, false),
            (br#"{"prompt":["a","b"]}"#, false),
            (br#"{"prompt":"x","temperature":3}"#, false),
            (br#"{"prompt":"x","stop":["a","b","c","d","e"]}"#, false),
            (br#"{}"#, false),
            (br#"{"messages":[]}"#, true),
            (br#"{"messages":[{"role":"wizard","content":"x"}]}"#, true),
            (br#"not json"#, false),
            (br#"{"prompt":7}"#, false),
            (br#"{"prompt":"x","stop":[1]}"#, false),
        ] {
            assert!(
                parse(body, chat, 100, &mut p).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn written_objects_are_json() {
        let i = Ident {
            kind: Kind::Chat,
            id: 3,
            created: 1,
            model: "m",
        };
        for (first, text, fin) in [
            (true, &b""[..], None),
            (false, b"hi", None),
            (false, b"", Some("length")),
        ] {
            let mut o = Vec::new();
            chunk(&mut o, &i, text, first, fin);
            let v: serde_json::Value =
                serde_json::from_slice(&o).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o)));
            assert_eq!(v["object"], "chat.completion.chunk");
        }
        let mut o = Vec::new();
        full(
            &mut o,
            &Ident {
                kind: Kind::Completion,
                ..i
            },
            b"t",
            "stop",
            2,
            3,
        );
        let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
        assert_eq!(
            (v["choices"][0]["text"].as_str(), v["usage"]["total_tokens"].as_u64()),
            (Some("t"), Some(5))
        );
        let mut o = Vec::new();
        error_body(&mut o, 429, "busy");
        let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_error");
        let mut o = Vec::new();
        usage_chunk(&mut o, &i, 1, 2);
        serde_json::from_slice::<serde_json::Value>(&o).unwrap();
        let mut o = Vec::new();
        models(&mut o, "m", &["a:v1".to_string(), "b:v2".to_string()], 5);
        let v: serde_json::Value = serde_json::from_slice(&o).unwrap();
        assert_eq!(
            (v["data"][0]["id"].as_str(), v["data"][2]["id"].as_str()),
            (Some("m"), Some("b:v2"))
        );
    }
}
