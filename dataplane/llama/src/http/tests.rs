//! Decoder tests: every split of the byte stream, every body framing, the
//! bounds.

use super::*;

/// Feeds `input` in pieces of `step` bytes, collecting lines and the end.
fn decode(input: &[u8], step: usize) -> Result<(ResponseHead, Vec<String>, bool), HttpError> {
    let mut d = ResponseDecoder::new(Limits::default());
    let mut head = None;
    let mut lines = Vec::new();
    let mut ended = false;
    for piece in input.chunks(step) {
        let mut pos = 0;
        loop {
            let (n, item) = d.next(&piece[pos..])?;
            pos += n;
            match item {
                Item::Pending => break,
                Item::Head(h) => head = Some(h),
                Item::Line => lines.push(String::from_utf8(d.line().to_vec()).unwrap()),
                Item::End => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            break;
        }
    }
    if !ended {
        loop {
            match d.eof()? {
                Item::Line => lines.push(String::from_utf8(d.line().to_vec()).unwrap()),
                Item::End => {
                    ended = true;
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    Ok((head.expect("head"), lines, ended))
}

const SSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: llama.cpp\r\nContent-Type: text/event-stream\r\n\
    Transfer-Encoding: chunked\r\nKeep-Alive: timeout=5, max=100\r\n\r\n\
    1c\r\ndata: {\"content\":\" Paris\"}\n\n\r\n\
    15;ext=1\r\ndata: {\"stop\":true}\n\n\r\n0\r\n\r\n";

#[test]
fn chunked_sse_any_split() {
    for step in 1..SSE.len() {
        let (head, lines, ended) = decode(SSE, step).unwrap();
        assert_eq!(head.status, 200);
        assert!(head.event_stream && head.keep_alive);
        assert_eq!(head.body, BodyKind::Chunked);
        assert_eq!(
            lines,
            ["data: {\"content\":\" Paris\"}", "", "data: {\"stop\":true}", ""],
            "step {step}"
        );
        assert!(ended);
    }
}

#[test]
fn content_length_and_close() {
    let r = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 12\r\nConnection: close\r\n\r\n{\"error\":1}\n";
    let (head, lines, _) = decode(r, 5).unwrap();
    assert_eq!(head.status, 400);
    assert!(!head.keep_alive);
    assert_eq!(lines, ["{\"error\":1}"]);
    let r = b"HTTP/1.0 200 OK\r\n\r\nline1\nlast";
    let (head, lines, ended) = decode(r, 3).unwrap();
    assert_eq!(head.body, BodyKind::UntilClose);
    assert_eq!(lines, ["line1", "last"]);
    assert!(ended);
}

#[test]
fn errors_are_typed() {
    assert!(matches!(decode(b"garbage\r\n\r\n", 4), Err(HttpError::Head(_))));
    let bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    assert!(matches!(decode(bad_chunk, 100), Err(HttpError::Chunked(_))));
    let truncated = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
    assert_eq!(decode(truncated, 100).unwrap_err(), HttpError::Truncated);
    let mut long_head = b"HTTP/1.1 200 OK\r\n".to_vec();
    long_head.extend(std::iter::repeat_n(b'x', 20_000));
    assert!(matches!(decode(&long_head, 1000), Err(HttpError::HeadTooLong(_))));
    let mut long_line = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n".to_vec();
    long_line.extend(std::iter::repeat_n(b'x', 100_000));
    assert!(matches!(decode(&long_line, 4096), Err(HttpError::LineTooLong(_))));
    let gz = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n";
    assert!(matches!(decode(gz, 100), Err(HttpError::Encoding(_))));
}

/// Deterministic pseudo-random bytes (xorshift) for the property test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Same outcome (lines, end, or the error) whole or in any pieces;
/// the twin of fuzz/fuzz_targets/llama_http.rs over mutated responses.
#[test]
fn outcome_does_not_depend_on_the_split() {
    let outcome = |input: &[u8], step: usize| match decode(input, step) {
        Ok((h, lines, ended)) => format!("{} {:?} {lines:?} {ended}", h.status, h.body),
        Err(e) => format!("error {e}"),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..3000 {
        let mut input = SSE.to_vec();
        for _ in 0..rng.below(4) {
            let at = rng.below(input.len());
            match rng.below(3) {
                0 => input[at] = rng.next() as u8,
                1 => {
                    input.remove(at);
                }
                _ => input.insert(at, b"\r\n0123456789abcdef:; "[rng.below(20)]),
            }
        }
        let whole = std::panic::catch_unwind(|| outcome(&input, input.len()));
        let Ok(whole) = whole else {
            // `decode` panics when no head was decoded; compare errors only.
            continue;
        };
        let step = 1 + rng.below(16);
        assert_eq!(
            outcome(&input, step),
            whole,
            "input {:?} step {step}",
            String::from_utf8_lossy(&input)
        );
    }
}

#[test]
fn stops_between_lines_and_resumes() {
    let mut d = ResponseDecoder::new(Limits::default());
    let (n, item) = d.next(SSE).unwrap();
    assert!(matches!(item, Item::Head(_)));
    let (m, item) = d.next(&SSE[n..]).unwrap();
    assert_eq!(item, Item::Line);
    assert_eq!(d.line(), b"data: {\"content\":\" Paris\"}");
    // The caller may stop here and come back with the unconsumed rest.
    let rest = &SSE[n + m..];
    let mut pos = 0;
    let mut lines = 0;
    loop {
        let (k, item) = d.next(&rest[pos..]).unwrap();
        pos += k;
        match item {
            Item::Line => lines += 1,
            Item::End => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(lines, 3);
    assert!(d.is_done());
    assert_eq!(pos, rest.len());
}

/// Issue 11, found by the `llama_http` fuzz target: a Content-Type whose
/// 17th byte falls inside a UTF-8 character panicked the worker (a str
/// sliced off a character boundary).
#[test]
fn issue11_a_content_type_with_a_multibyte_char_is_not_a_panic() {
    let input = "HTTP/1.1 200 OK\r\nContent-Type: text/event======\u{f8}==\r\nContent-Length: 0\r\n\r\n";
    let (head, lines, ended) = decode(input.as_bytes(), 1).unwrap();
    assert!(!head.event_stream, "not an event stream");
    assert!(lines.is_empty() && ended);
    let sse = "HTTP/1.1 200 OK\r\nContent-Type: TEXT/EVENT-STREAM; charset=\u{f8}\r\nContent-Length: 0\r\n\r\n";
    assert!(decode(sse.as_bytes(), 3).unwrap().0.event_stream);
}
