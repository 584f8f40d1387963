//! Properties of the llama backend's HTTP response decoder and SSE event
//! parser on arbitrary bytes (what a broken or hostile llama-server could
//! send):
//! - never panics;
//! - the items (or the error) do not depend on how the bytes are split;
//! - every line handed out is within the line bound.
#![no_main]

use cnse_llama::http::{Item, Limits, ResponseDecoder};
use cnse_llama::sse;
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits {
    head_bytes_max: 1024,
    line_bytes_max: 256,
};

#[derive(Debug, PartialEq)]
enum Out {
    Head(u16, bool),
    Line(Vec<u8>),
    End,
    Error(String),
}

fn run(data: &[u8], piece: usize, eof: bool) -> Vec<Out> {
    let mut d = ResponseDecoder::new(LIMITS);
    let mut out = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        let mut pos = 0;
        loop {
            match d.next(&chunk[pos..]) {
                Ok((n, item)) => {
                    pos += n;
                    match item {
                        Item::Pending => break,
                        Item::Head(h) => out.push(Out::Head(h.status, h.keep_alive)),
                        Item::Line => {
                            assert!(d.line().len() <= LIMITS.line_bytes_max);
                            // The event parser takes any line without panicking.
                            let _ = sse::parse_line(d.line());
                            out.push(Out::Line(d.line().to_vec()));
                        }
                        Item::End => {
                            out.push(Out::End);
                            return out;
                        }
                    }
                }
                Err(e) => {
                    out.push(Out::Error(e.to_string()));
                    return out;
                }
            }
        }
        assert_eq!(pos, chunk.len());
    }
    if eof {
        loop {
            match d.eof() {
                Ok(Item::Line) => out.push(Out::Line(d.line().to_vec())),
                Ok(Item::End) => {
                    out.push(Out::End);
                    break;
                }
                Ok(other) => panic!("eof gave {other:?}"),
                Err(e) => {
                    out.push(Out::Error(e.to_string()));
                    break;
                }
            }
        }
    }
    out
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let piece = usize::from(input[0]) + 1;
    let eof = input[1] & 1 == 1;
    let data = &input[2..];
    let whole = run(data, data.len().max(1), eof);
    assert_eq!(run(data, piece, eof), whole);
    assert_eq!(run(data, 1, eof), whole);
});
