//! HTTP/1.1 requests out of a connection's input buffer: the head through
//! `httparse`, then the body by `Content-Length` or chunked transfer
//! coding, each bounded. Pure: bytes in, a parsed request or "need more"
//! out, and an error that names the status to answer with.

/// Most bytes of a request head (request line and headers).
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Most headers of one request.
const HEADERS_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Other,
}

/// What the head says, copied out of the buffer (the buffer moves on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub method: Method,
    pub route: Route,
    /// Bytes of the head, up to and including the blank line.
    pub len: usize,
    pub body: BodyKind,
    /// HTTP/1.1 without `Connection: close`, or HTTP/1.0 with keep-alive.
    pub keep_alive: bool,
    pub auth: Auth,
    pub session: SessionHeader,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Completions,
    ChatCompletions,
    Models,
    Health,
    Metrics,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    None,
    Length(usize),
    Chunked,
}

/// The `Authorization` header, as far as the key check needs it: where the
/// bearer token lies in the head (offset, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Auth {
    Missing,
    Bearer { at: usize, len: usize },
    Malformed,
}

/// The `X-Session-Id` header (docs/HTTP.md): where a valid key lies in the
/// head (offset, length). The key is what a binary REQUEST's session key
/// is (docs/PROTOCOL.md, "Session keys"): 1-256 visible ASCII bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionHeader {
    Missing,
    Key { at: usize, len: usize },
    Invalid,
}

/// A request that cannot be served, and the status that says why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: &'static str,
}

const fn err(status: u16, message: &'static str) -> HttpError {
    HttpError { status, message }
}

/// Parses a request head at the start of `buf`: `Ok(None)` until it is
/// complete.
pub fn head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > HEAD_BYTES_MAX => {
            return Err(err(431, "request head too large"));
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(err(431, "too many request headers")),
        Err(_) => return Err(err(400, "malformed HTTP request")),
    };
    if len > HEAD_BYTES_MAX {
        return Err(err(431, "request head too large"));
    }
    let method = match req.method {
        Some("GET") => Method::Get,
        Some("POST") => Method::Post,
        _ => Method::Other,
    };
    let path = req.path.unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let route = match path.trim_end_matches('/') {
        "/v1/completions" => Route::Completions,
        "/v1/chat/completions" => Route::ChatCompletions,
        "/v1/models" => Route::Models,
        "/health" => Route::Health,
        "/metrics" => Route::Metrics,
        _ => Route::Unknown,
    };
    let version = req.version.unwrap_or(1);
    let mut keep_alive = version == 1;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut auth = Auth::Missing;
    let mut session = SessionHeader::Missing;
    let base = buf.as_ptr() as usize;
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or(err(400, "invalid Content-Length"))?;
            if length.is_some_and(|l| l != v) {
                return Err(err(400, "conflicting Content-Length headers"));
            }
            length = Some(v);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let v = std::str::from_utf8(h.value).map_err(|_| err(400, "invalid Transfer-Encoding"))?;
            // Only `chunked` (last) is understood; anything else is refused
            // rather than guessed at.
            match v.trim().rsplit(',').next().map(str::trim) {
                Some(t) if t.eq_ignore_ascii_case("chunked") => chunked = true,
                _ => return Err(err(501, "unsupported Transfer-Encoding")),
            }
        } else if name.eq_ignore_ascii_case("connection") {
            let v = std::str::from_utf8(h.value).unwrap_or("");
            for t in v.split(',').map(str::trim) {
                if t.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("x-session-id") {
            let key = h.value.trim_ascii();
            session = match session {
                SessionHeader::Missing if cnse_proto::session_key_valid(key) => SessionHeader::Key {
                    at: key.as_ptr() as usize - base,
                    len: key.len(),
                },
                // Invalid, or given twice.
                _ => SessionHeader::Invalid,
            };
        } else if name.eq_ignore_ascii_case("authorization") {
            auth = match h.value.strip_prefix(b"Bearer ") {
                Some(token) => {
                    let token = token.trim_ascii();
                    Auth::Bearer {
                        at: token.as_ptr() as usize - base,
                        len: token.len(),
                    }
                }
                None => Auth::Malformed,
            };
        }
    }
    if chunked && length.is_some() {
        // RFC 9112 6.3: a message with both is an attack vector; refuse it.
        return Err(err(400, "both Content-Length and Transfer-Encoding"));
    }
    let body = match (chunked, length) {
        (true, _) => BodyKind::Chunked,
        (false, Some(0) | None) => BodyKind::None,
        (false, Some(n)) => BodyKind::Length(n),
    };
    Ok(Some(Head {
        method,
        route,
        len,
        body,
        keep_alive,
        auth,
        session,
    }))
}

/// The body that follows a head of `len` bytes in `buf`: `Ok(None)` until
/// all of it arrived; then the bytes the request took in all (head, body
/// and chunk framing). A chunked body is decoded into `out`, a
/// `Content-Length` one is left in place (`buf[head.len..head.len + n]`).
pub fn body(buf: &[u8], h: &Head, max: usize, out: &mut Vec<u8>) -> Result<Option<usize>, HttpError> {
    match h.body {
        BodyKind::None => Ok(Some(h.len)),
        BodyKind::Length(n) if n > max => Err(err(413, "request body too large")),
        BodyKind::Length(n) => Ok((buf.len() >= h.len + n).then_some(h.len + n)),
        BodyKind::Chunked => chunked(&buf[h.len..], max, out).map(|r| r.map(|used| h.len + used)),
    }
}

/// Decodes a chunked body at the start of `buf` into `out` (cleared
/// first); `Ok(None)` while incomplete, else the bytes it spans.
fn chunked(buf: &[u8], max: usize, out: &mut Vec<u8>) -> Result<Option<usize>, HttpError> {
    out.clear();
    let mut at = 0;
    loop {
        let Some(eol) = line_end(&buf[at..], CHUNK_LINE_MAX).map_err(|()| err(400, "malformed chunk size line"))?
        else {
            return Ok(None);
        };
        let line = &buf[at..at + eol];
        // Chunk extensions (`;name=value`) are allowed and ignored.
        let size_text = line.split(|&b| b == b';').next().unwrap_or(&[]);
        let size_text = std::str::from_utf8(size_text)
            .map_err(|_| err(400, "malformed chunk size"))?
            .trim();
        if size_text.is_empty() || size_text.len() > 15 {
            return Err(err(400, "malformed chunk size"));
        }
        let size = usize::from_str_radix(size_text, 16).map_err(|_| err(400, "malformed chunk size"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then the blank line.
            loop {
                let Some(eol) =
                    line_end(&buf[at..], TRAILER_LINE_MAX).map_err(|()| err(400, "malformed chunked trailer"))?
                else {
                    return Ok(None);
                };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if out.len() + size > max {
            return Err(err(413, "request body too large"));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&buf[at..at + size]);
        if &buf[at + size..at + size + 2] != b"\r\n" {
            return Err(err(400, "chunk not followed by CRLF"));
        }
        at += size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// Longest chunk-size line (extensions included) and trailer line taken.
const CHUNK_LINE_MAX: usize = 1024;
const TRAILER_LINE_MAX: usize = 4096;

/// Where the line at the start of `b` ends (its CRLF), `Ok(None)` while it
/// may still end within `max` bytes, `Err` once it is longer, whether its
/// CRLF has arrived or not: the same answer for a request however it is
/// split across reads (a cut CRLF's CR counts as the line's end).
fn line_end(b: &[u8], max: usize) -> Result<Option<usize>, ()> {
    match find_crlf(b) {
        Some(eol) if eol > max => Err(()),
        Some(eol) => Ok(Some(eol)),
        None if b.len() > max + 1 => Err(()),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_parses_once_complete() {
        let req =
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: Bearer k3y\r\n\r\n{}";
        for cut in 0..req.len() - 2 {
            assert_eq!(head(&req[..cut]).unwrap(), None, "cut at {cut}");
        }
        let h = head(req).unwrap().unwrap();
        assert_eq!(
            (h.method, h.route, h.body, h.keep_alive),
            (Method::Post, Route::Completions, BodyKind::Length(2), true)
        );
        let Auth::Bearer { at, len } = h.auth else {
            panic!("{:?}", h.auth)
        };
        assert_eq!(&req[at..at + len], b"k3y");
        let mut out = Vec::new();
        assert_eq!(body(req, &h, 100, &mut out).unwrap(), Some(req.len()));
        assert_eq!(body(&req[..req.len() - 1], &h, 100, &mut out).unwrap(), None);
    }

    #[test]
    fn issue14_x_session_id_is_found_or_refused() {
        let key = |r: &[u8]| {
            let h = head(r).unwrap().unwrap();
            match h.session {
                SessionHeader::Key { at, len } => Ok(r[at..at + len].to_vec()),
                other => Err(other),
            }
        };
        assert_eq!(
            key(b"POST /v1/completions HTTP/1.1\r\nx-session-id:  conv-7 \r\n\r\n"),
            Ok(b"conv-7".to_vec())
        );
        assert_eq!(key(b"POST / HTTP/1.1\r\n\r\n"), Err(SessionHeader::Missing));
        let long = [
            b"POST / HTTP/1.1\r\nX-Session-Id: ".as_slice(),
            &[b'k'; 257],
            b"\r\n\r\n",
        ]
        .concat();
        for bad in [
            &b"POST / HTTP/1.1\r\nX-Session-Id: two words\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nX-Session-Id:\r\n\r\n",
            b"POST / HTTP/1.1\r\nX-Session-Id: a\r\nX-Session-Id: b\r\n\r\n",
            &long,
        ] {
            assert_eq!(key(bad), Err(SessionHeader::Invalid));
        }
    }

    #[test]
    fn chunked_bodies_decode_at_any_split() {
        let req = b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nabcd\r\n3\r\nefg\r\n0\r\nX-Trailer: 1\r\n\r\nNEXT";
        let h = head(req).unwrap().unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        let mut out = Vec::new();
        let full = req.len() - 4;
        for cut in h.len..full {
            assert_eq!(body(&req[..cut], &h, 100, &mut out).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(body(req, &h, 100, &mut out).unwrap(), Some(full));
        assert_eq!(out, b"abcdefg");
        assert_eq!(body(req, &h, 5, &mut out).unwrap_err().status, 413);
    }

    #[test]
    fn long_chunk_lines_get_one_answer_however_the_body_is_split() {
        // The fuzzer's finding: a chunk-size line of more than 1,024 bytes
        // (a long extension) was refused while its CRLF had not arrived and
        // taken once it had, so one request got two answers by its split.
        // Now a line is refused past the bound either way, and one within
        // it is "need more" at every cut.
        let h = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        let request = |line_len: usize, trailer_len: usize| {
            let ext = ";".to_string() + &"e".repeat(line_len - 2);
            let trailer = "X: ".to_string() + &"t".repeat(trailer_len - 3);
            format!("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2{ext}\r\nhi\r\n0\r\n{trailer}\r\n\r\n")
                .into_bytes()
        };
        let mut out = Vec::new();
        for (line, trailer, whole) in [
            (CHUNK_LINE_MAX, TRAILER_LINE_MAX, Ok(())),
            (CHUNK_LINE_MAX + 1, 10, Err("malformed chunk size line")),
            (1500, 10, Err("malformed chunk size line")),
            (10, TRAILER_LINE_MAX + 1, Err("malformed chunked trailer")),
        ] {
            let req = request(line, trailer);
            let answer = body(&req, &h, 100, &mut out);
            match whole {
                Ok(()) => assert_eq!(answer, Ok(Some(req.len())), "{line} {trailer}"),
                Err(m) => assert_eq!(answer.unwrap_err().message, m, "{line} {trailer}"),
            }
            for cut in h.len..req.len() {
                match body(&req[..cut], &h, 100, &mut out) {
                    Ok(None) => {}
                    Err(e) => assert_eq!(Err(e.message), whole.map(|()| ""), "cut at {cut} of {line} {trailer}"),
                    Ok(Some(n)) => panic!("a cut body was taken whole: {n} at {cut}"),
                }
            }
        }
    }

    #[test]
    fn bad_requests_name_their_status() {
        let status = |r: &[u8]| head(r).unwrap_err().status;
        assert_eq!(status(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
        assert_eq!(status(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"), 501);
        assert_eq!(status(b"GARBAGE\x01\r\n\r\n"), 400);
        let big = [b"GET / HTTP/1.1\r\nX: ".as_slice(), &[b'a'; HEAD_BYTES_MAX]].concat();
        assert_eq!(status(&big), 431);
        let h = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            body(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                &h,
                10,
                &mut Vec::new()
            )
            .unwrap_err()
            .status,
            400
        );
    }

    #[test]
    fn connection_close_and_http10() {
        let h = head(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.route, Route::Health);
        let h = head(b"GET /v1/models?x=1 HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        assert_eq!(h.route, Route::Models);
    }
}
