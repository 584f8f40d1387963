//! The HTTP front's request parser (`cnse_server::http_parse`) on
//! arbitrary bytes:
//! - never panics;
//! - a head it accepts spans no more than the buffer and the bound, its
//!   bearer token lies inside the head, and the same head comes out of the
//!   head's bytes alone; every shorter prefix is "need more", never an
//!   error (a request split across reads is not refused);
//! - a body it accepts is within the limit, and a prefix of the request
//!   cut anywhere before its end is "need more" with the same outcome once
//!   complete (chunked bodies decode the same).
#![no_main]

use cnse_server::http_parse::{body, head, Auth, BodyKind, HEAD_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

const BODY_MAX: usize = 2048;

fuzz_target!(|input: &[u8]| {
    let Some((&cut, buf)) = input.split_first() else {
        return;
    };
    let Ok(Some(h)) = head(buf) else {
        return;
    };
    assert!(h.len <= buf.len() && h.len <= HEAD_BYTES_MAX);
    if let Auth::Bearer { at, len } = h.auth {
        assert!(at + len <= h.len);
    }
    assert_eq!(head(&buf[..h.len]), Ok(Some(h)));
    let short = h.len * usize::from(cut) / 256;
    assert_eq!(
        head(&buf[..short]),
        Ok(None),
        "prefix of {short} bytes of a {}-byte head",
        h.len
    );

    let mut out = Vec::new();
    let Ok(Some(used)) = body(buf, &h, BODY_MAX, &mut out) else {
        return;
    };
    assert!(used >= h.len && used <= buf.len());
    match h.body {
        BodyKind::None => assert_eq!(used, h.len),
        BodyKind::Length(n) => assert!(n <= BODY_MAX && used == h.len + n),
        BodyKind::Chunked => assert!(out.len() <= BODY_MAX),
    }
    let mut again = Vec::new();
    assert_eq!(body(&buf[..used], &h, BODY_MAX, &mut again), Ok(Some(used)));
    if h.body == BodyKind::Chunked {
        assert_eq!(again, out);
    }
    if used > h.len {
        let short = h.len + (used - h.len) * usize::from(cut) / 256;
        assert_eq!(
            body(&buf[..short], &h, BODY_MAX, &mut again),
            Ok(None),
            "body cut at {short} of {used}"
        );
    }
});
