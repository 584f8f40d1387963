//! llama-server's streamed `/completion` events, pure: one SSE line in, one
//! typed event out. The JSON is parsed in place (content borrowed unless it
//! carries escapes) and the token-id array is counted, not collected.

use std::borrow::Cow;
use std::fmt;

use cnse_proto::FinishReason;
use serde::de::{Deserializer, IgnoredAny, SeqAccess, Visitor};
use serde::Deserialize;

/// One line of the event stream, classified.
#[derive(Debug, PartialEq)]
pub enum SseLine<'a> {
    /// A `data:` line carrying a completion event.
    Event(Event<'a>),
    /// An error reported in the stream (`error:` line or `{"error": ...}`).
    Error(String),
    /// Blank separator, comment, `data: [DONE]` or a field we do not use.
    Skip,
}

/// One completion event (`POST /completion` with `"stream": true`).
#[derive(Debug, Default, PartialEq, Deserialize)]
pub struct Event<'a> {
    /// Text of the tokens this event carries (may be empty while
    /// llama-server holds back a partial stop word or UTF-8 sequence).
    #[serde(borrow, default)]
    pub content: Cow<'a, str>,
    /// Number of token ids in `tokens` (one per event while generating).
    #[serde(default, rename = "tokens", deserialize_with = "count_seq")]
    pub token_count: u32,
    #[serde(default)]
    pub stop: bool,
    /// On the last event: `limit` (n_predict or context), `eos`, `word`.
    #[serde(borrow, default)]
    pub stop_type: Option<Cow<'a, str>>,
    /// On the last event: tokens generated in total.
    #[serde(default)]
    pub tokens_predicted: Option<u64>,
    /// Prompt tokens of the request (`/completion`'s token events).
    #[serde(default)]
    pub tokens_evaluated: Option<u64>,
    /// On the last event (`/completion` and chat): prompt tokens taken from
    /// the KV cache and evaluated.
    #[serde(default)]
    timings: Option<Timings>,
    #[serde(default)]
    error: Option<ErrorBody<'a>>,
    /// `/v1/chat/completions` chunks carry their text and finish here.
    #[serde(borrow, default)]
    choices: Vec<Choice<'a>>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct Timings {
    #[serde(default)]
    cache_n: i64,
    #[serde(default)]
    prompt_n: i64,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Delta<'a>,
    #[serde(borrow, default)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Debug, Default, PartialEq, Deserialize)]
struct Delta<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct ErrorBody<'a> {
    #[serde(default)]
    code: Option<i64>,
    #[serde(borrow, default)]
    message: Option<Cow<'a, str>>,
}

impl Event<'_> {
    /// The request's prompt tokens as llama-server counted them: cached
    /// plus evaluated (`timings`), else `tokens_evaluated`.
    pub fn prompt_tokens(&self) -> Option<u64> {
        match &self.timings {
            Some(t) => Some(t.cache_n.max(0) as u64 + t.prompt_n.max(0) as u64),
            None => self.tokens_evaluated,
        }
    }

    /// Prompt tokens taken from llama-server's KV cache and evaluated
    /// (`timings.cache_n`, `timings.prompt_n`), on the last event.
    pub fn cache_split(&self) -> Option<(u64, u64)> {
        self.timings
            .as_ref()
            .map(|t| (t.cache_n.max(0) as u64, t.prompt_n.max(0) as u64))
    }

    /// The CNSE finish reason of the last event.
    pub fn finish_reason(&self) -> FinishReason {
        match self.stop_type.as_deref() {
            Some("limit") => FinishReason::Length,
            // eos, word, and anything a newer server may add: the model or a
            // stop condition ended it, not the token budget.
            _ => FinishReason::Stop,
        }
    }
}

fn count_seq<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    struct Count;
    impl<'de> Visitor<'de> for Count {
        type Value = u32;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an array of token ids")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<u32, A::Error> {
            let mut n = 0u32;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n = n.saturating_add(1);
            }
            Ok(n)
        }
        fn visit_unit<E>(self) -> Result<u32, E> {
            Ok(0)
        }
    }
    d.deserialize_any(Count)
}

/// Longest error message kept from the stream.
const ERROR_MESSAGE_CHARS_MAX: usize = 300;

/// Classifies one SSE line (without its line ending).
pub fn parse_line(line: &[u8]) -> Result<SseLine<'_>, String> {
    if let Some(rest) = field(line, b"data:") {
        if rest == b"[DONE]" {
            return Ok(SseLine::Skip);
        }
        let mut event: Event = serde_json::from_slice(rest).map_err(|e| format!("bad event JSON: {e}"))?;
        if let Some(err) = &event.error {
            return Ok(SseLine::Error(error_text(err)));
        }
        if let Some(choice) = event.choices.pop() {
            // A chat chunk: one token's text per chunk; the last names
            // why it ended. A usage-only chunk (no choices) is skipped.
            event.content = choice.delta.content.unwrap_or_default();
            if let Some(reason) = choice.finish_reason {
                event.stop = true;
                event.stop_type = Some(Cow::Borrowed(if reason == "length" { "limit" } else { "eos" }));
            }
        } else if rest.windows(10).any(|w| w == b"\"choices\":") {
            return Ok(SseLine::Skip);
        }
        return Ok(SseLine::Event(event));
    }
    if let Some(rest) = field(line, b"error:") {
        let text = match serde_json::from_slice::<ErrorWrapper>(rest) {
            Ok(ErrorWrapper { error: Some(e) }) => error_text(&e),
            _ => excerpt(rest),
        };
        return Ok(SseLine::Error(text));
    }
    // Blank lines separate events; ':' starts a comment; event:/id:/retry:
    // carry nothing llama-server's completion stream needs.
    Ok(SseLine::Skip)
}

#[derive(Deserialize)]
struct ErrorWrapper<'a> {
    #[serde(borrow, default)]
    error: Option<ErrorBody<'a>>,
}

fn field<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let rest = line.strip_prefix(name)?;
    Some(rest.strip_prefix(b" ").unwrap_or(rest))
}

fn error_text(e: &ErrorBody) -> String {
    let msg = e.message.as_deref().unwrap_or("unspecified error");
    let msg: String = msg.chars().take(ERROR_MESSAGE_CHARS_MAX).collect();
    match e.code {
        Some(c) => format!("llama-server error {c}: {msg}"),
        None => format!("llama-server error: {msg}"),
    }
}

/// The start of a body for a human message: lossy UTF-8, bounded.
pub fn excerpt(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(ERROR_MESSAGE_CHARS_MAX)]).into_owned()
}

/// A human message for a non-200 answer from its first body line: the
/// llama-server `{"error":{"message":...}}` text when present.
pub fn status_message(status: u16, first_line: &[u8]) -> String {
    match serde_json::from_slice::<ErrorWrapper>(first_line) {
        Ok(ErrorWrapper { error: Some(e) }) => format!("llama-server answered HTTP {status}: {}", error_text(&e)),
        _ if first_line.is_empty() => format!("llama-server answered HTTP {status}"),
        _ => format!("llama-server answered HTTP {status}: {}", excerpt(first_line)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_chunks() {
        let token = br#"data: {"choices":[{"finish_reason":null,"index":0,"delta":{"content":" Hi"}}],"created":1,"id":"chatcmpl-x","model":"m","object":"chat.completion.chunk"}"#;
        let SseLine::Event(e) = parse_line(token).unwrap() else {
            panic!()
        };
        assert_eq!((e.content.as_ref(), e.stop), (" Hi", false));
        let last =
            br#"data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk"}"#;
        let SseLine::Event(e) = parse_line(last).unwrap() else {
            panic!()
        };
        assert!(e.stop && e.content.is_empty());
        assert_eq!(e.finish_reason(), FinishReason::Length);
        let usage = br#"data: {"choices":[],"usage":{"completion_tokens":3}}"#;
        assert_eq!(parse_line(usage).unwrap(), SseLine::Skip);
    }

    #[test]
    fn real_server_events() {
        let token = br#"data: {"index":0,"content":" Paris","tokens":[7042],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":5}"#;
        let SseLine::Event(e) = parse_line(token).unwrap() else {
            panic!()
        };
        assert_eq!(e.content, " Paris");
        assert!(matches!(e.content, Cow::Borrowed(_)));
        assert_eq!(e.token_count, 1);
        assert!(!e.stop);
        let last = br#"data: {"content":"","tokens":[],"stop":true,"stop_type":"limit","tokens_predicted":8,"timings":{"predicted_n":8}}"#;
        let SseLine::Event(e) = parse_line(last).unwrap() else {
            panic!()
        };
        assert!(e.stop);
        assert_eq!(e.token_count, 0);
        assert_eq!(e.tokens_predicted, Some(8));
        assert_eq!(e.finish_reason(), FinishReason::Length);
        let eos = br#"data: {"content":"","stop":true,"stop_type":"eos"}"#;
        let SseLine::Event(e) = parse_line(eos).unwrap() else {
            panic!()
        };
        assert_eq!(e.finish_reason(), FinishReason::Stop);
        let escaped = br#"data: {"content":"a\n\u00e9","tokens":[1,2]}"#;
        let SseLine::Event(e) = parse_line(escaped).unwrap() else {
            panic!()
        };
        assert_eq!(e.content, "a\n\u{e9}");
        assert_eq!(e.token_count, 2);
    }

    #[test]
    fn prompt_tokens_are_llama_servers_own_count() {
        // Recorded from llama-server b10434: the prompt's 8 tokens, 7 of
        // them from the KV cache on a repeat.
        let token = br#"data: {"index":0,"content":" sea","tokens":[198],"stop":false,"id_slot":-1,"tokens_predicted":1,"tokens_evaluated":8}"#;
        let last = br#"data: {"content":"","tokens":[],"stop":true,"stop_type":"limit","stopping_word":"","tokens_predicted":3,"timings":{"cache_n":7,"prompt_n":1,"prompt_ms":17.41,"predicted_n":3}}"#;
        let chat = br#"data: {"choices":[{"finish_reason":"length","index":0,"delta":{}}],"object":"chat.completion.chunk","timings":{"cache_n":0,"prompt_n":31,"prompt_ms":76.33}}"#;
        let none = br#"data: {"content":"","stop":true,"stop_type":"eos"}"#;
        let count = |line: &[u8]| match parse_line(line).unwrap() {
            SseLine::Event(e) => e.prompt_tokens(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            [count(token), count(last), count(chat), count(none)],
            [Some(8), Some(8), Some(31), None]
        );
    }

    #[test]
    fn errors_and_skips() {
        assert_eq!(parse_line(b"").unwrap(), SseLine::Skip);
        assert_eq!(parse_line(b": keep-alive").unwrap(), SseLine::Skip);
        assert_eq!(parse_line(b"data: [DONE]").unwrap(), SseLine::Skip);
        let e = parse_line(br#"error: {"error":{"code":500,"message":"boom"}}"#).unwrap();
        assert_eq!(e, SseLine::Error("llama-server error 500: boom".into()));
        let e = parse_line(br#"data: {"error":{"code":400,"message":"context"}}"#).unwrap();
        assert_eq!(e, SseLine::Error("llama-server error 400: context".into()));
        assert!(parse_line(b"data: {not json").is_err());
        assert!(parse_line(br#"data: {"tokens":"x"}"#).is_err());
        assert_eq!(
            status_message(400, br#"{"error":{"code":400,"message":"bad n_predict","type":"x"}}"#),
            "llama-server answered HTTP 400: llama-server error 400: bad n_predict"
        );
    }
}
