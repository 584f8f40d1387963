//! A small blocking HTTP/1.1 client: one request per connection over
//! `std::net::TcpStream`, response heads parsed with `httparse`, bodies read
//! by Content-Length, chunked encoding or connection close. Enough for the
//! SeaweedFS Filer calls the remote makes, and nothing more.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Result, StoreError};

/// Longest response head we accept.
const HEAD_BYTES_MAX: usize = 64 << 10;
/// Most response headers we accept.
const HEADERS_MAX: usize = 64;
/// Longest chunk-size line of a chunked body.
const CHUNK_LINE_BYTES_MAX: usize = 4096;
pub const CONNECT_TIMEOUT_MS: u64 = 10_000;
pub const IO_TIMEOUT_MS: u64 = 60_000;
/// Receive buffer size; reads from the socket are at most this big.
const RECV_BUFFER_BYTES: usize = 256 << 10;

/// An `http://host[:port][/base]` URL. `https` is refused: a filer is reached
/// on a trusted network, and integrity comes from the digests, not the
/// transport.
#[derive(Debug, Clone)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Base path without a trailing slash ("" for the root).
    pub base: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url> {
        let bad = |reason: &str| StoreError::BadOption {
            option: "--filer",
            reason: format!("{s:?}: {reason}"),
        };
        let rest = s
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if path.contains(['?', '#', ' ']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed IPv6 bracket"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => 80,
                None => return Err(bad("junk after IPv6 address")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() || authority.contains('@') {
            return Err(bad("missing host (user info is not supported)"));
        }
        Ok(Url {
            host,
            port,
            base: path.trim_end_matches('/').to_string(),
        })
    }

    /// The request target for `rel` (empty, or starting with `/`) under the base.
    pub fn target(&self, rel: &str) -> String {
        format!("{}{rel}", self.base)
    }

    pub fn display(&self, rel: &str) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}{}", self.host, self.port, self.target(rel))
        } else {
            format!("http://{}:{}{}", self.host, self.port, self.target(rel))
        }
    }

    fn host_header(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

enum BodyKind {
    None,
    Length(u64),
    Chunked { left_in_chunk: u64, done: bool },
    UntilClose,
}

/// A response whose body is read as a stream.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    kind: BodyKind,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.trim().parse().ok())
    }

    /// Reads the whole body, refusing more than `max_bytes`.
    pub fn read_body(&mut self, max_bytes: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.take(max_bytes + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("body longer than {max_bytes} bytes"),
            ));
        }
        Ok(out)
    }

    fn read_chunk_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        (&mut self.reader)
            .take(CHUNK_LINE_BYTES_MAX as u64)
            .read_until(b'\n', &mut line)?;
        if !line.ends_with(b"\n") {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad chunked encoding line"));
        }
        String::from_utf8(line).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "non-UTF-8 chunk line"))
    }
}

impl Read for Response {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.kind {
            BodyKind::None => Ok(0),
            BodyKind::Length(0) => Ok(0),
            BodyKind::Length(left) => {
                let want = buf.len().min(left.min(usize::MAX as u64) as usize);
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("body ended {left} bytes early"),
                    ));
                }
                self.kind = BodyKind::Length(left - n as u64);
                Ok(n)
            }
            BodyKind::UntilClose => self.reader.read(buf),
            BodyKind::Chunked { done: true, .. } => Ok(0),
            BodyKind::Chunked {
                left_in_chunk: 0,
                done: false,
            } => {
                let line = self.read_chunk_line()?;
                let size_text = line.trim_end().split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while self.read_chunk_line()?.trim_end() != "" {}
                    self.kind = BodyKind::Chunked {
                        left_in_chunk: 0,
                        done: true,
                    };
                    return Ok(0);
                }
                self.kind = BodyKind::Chunked {
                    left_in_chunk: size,
                    done: false,
                };
                self.read(buf)
            }
            BodyKind::Chunked {
                left_in_chunk,
                done: false,
            } => {
                let want = buf.len().min(left_in_chunk.min(usize::MAX as u64) as usize);
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "chunked body ended early"));
                }
                let left = left_in_chunk - n as u64;
                if left == 0 {
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                    if &crlf != b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk not followed by CRLF"));
                    }
                }
                self.kind = BodyKind::Chunked {
                    left_in_chunk: left,
                    done: false,
                };
                Ok(n)
            }
        }
    }
}

/// Sends one request and returns the response with its body unread.
/// `body` is sent with a Content-Length.
pub fn request(
    url: &Url,
    method: &'static str,
    rel: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response> {
    let full = url.display(rel);
    let fail = |reason: String| StoreError::Http {
        method,
        url: full.clone(),
        reason,
    };
    let addrs = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| fail(format!("resolve: {e}")))?;
    let mut last = None;
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, Duration::from_millis(CONNECT_TIMEOUT_MS)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = stream.ok_or_else(|| {
        fail(format!(
            "connect: {}",
            last.map_or("no address".into(), |e| e.to_string())
        ))
    })?;
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))
        .map_err(|e| fail(e.to_string()))?;
    stream
        .set_write_timeout(Some(Duration::from_millis(IO_TIMEOUT_MS)))
        .map_err(|e| fail(e.to_string()))?;

    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cnse-dp/{}\r\nConnection: close\r\n",
        url.target(rel),
        url.host_header(),
        env!("CARGO_PKG_VERSION")
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut w = &stream;
    w.write_all(head.as_bytes()).map_err(|e| fail(format!("send: {e}")))?;
    if let Some(b) = body {
        // Large bodies go out in pieces so a timeout names progress, not a
        // single giant write.
        for piece in b.chunks(8 << 20) {
            w.write_all(piece).map_err(|e| fail(format!("send body: {e}")))?;
        }
    }

    let mut reader = BufReader::with_capacity(RECV_BUFFER_BYTES, stream);
    let mut raw = Vec::with_capacity(1024);
    loop {
        let before = raw.len();
        (&mut reader)
            .take((HEAD_BYTES_MAX - raw.len()) as u64)
            .read_until(b'\n', &mut raw)
            .map_err(|e| fail(format!("receive: {e}")))?;
        if raw.len() == before {
            return Err(fail("connection closed before a response".into()));
        }
        if raw.ends_with(b"\r\n\r\n") || raw.ends_with(b"\n\n") {
            break;
        }
        if raw.len() >= HEAD_BYTES_MAX {
            return Err(fail(format!("response head longer than {HEAD_BYTES_MAX} bytes")));
        }
    }
    let mut hbuf = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut parsed = httparse::Response::new(&mut hbuf);
    match parsed.parse(&raw) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(fail("incomplete response head".into())),
        Err(e) => return Err(fail(format!("bad response head: {e}"))),
    }
    let status = parsed.code.unwrap_or(0);
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned()))
        .collect();
    let get = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.trim().to_string())
    };
    let kind = if method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status) {
        BodyKind::None
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        BodyKind::Chunked {
            left_in_chunk: 0,
            done: false,
        }
    } else if let Some(v) = get("content-length") {
        BodyKind::Length(v.parse().map_err(|_| fail(format!("bad Content-Length {v:?}")))?)
    } else {
        BodyKind::UntilClose
    };
    Ok(Response {
        status,
        headers,
        reader,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve_once(reply: &'static [u8]) -> Url {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            s.write_all(reply).unwrap();
        });
        Url::parse(&format!("http://127.0.0.1:{port}/base/")).unwrap()
    }

    #[test]
    fn url_forms() {
        let u = Url::parse("http://filer:8888/models/").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.base.as_str()), ("filer", 8888, "/models"));
        assert_eq!(u.target("/x"), "/models/x");
        let u = Url::parse("http://[::1]:9/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 9));
        assert_eq!(Url::parse("http://h").unwrap().port, 80);
        for bad in [
            "https://h/",
            "h:80",
            "http://:80/",
            "http://h:x/",
            "http://u@h/",
            "http://h/a?b",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn reads_chunked_bodies() {
        let url = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
        );
        let mut r = request(&url, "GET", "/f", &[], None).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.read_body(100).unwrap(), b"hello world");
    }

    #[test]
    fn short_body_is_an_error() {
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        let mut r = request(&url, "GET", "/f", &[], None).unwrap();
        assert!(r.read_body(100).is_err());
    }

    #[test]
    fn head_has_no_body_and_limits_hold() {
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n");
        let r = request(&url, "HEAD", "/f", &[], None).unwrap();
        assert_eq!(r.content_length(), Some(10));
        let url = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789");
        let mut r = request(&url, "GET", "/f", &[], None).unwrap();
        assert!(r.read_body(5).is_err());
    }
}
