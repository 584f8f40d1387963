//! A blocking CNSE client: one `TcpStream`, frames cut by the protocol
//! crate's [`FrameDecoder`], every read bounded by a timeout.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use cnse_proto::{end_times, Direction, FinishReason, FrameDecoder, Kind, Params};

use crate::{ClientError, Writer};

/// Largest payload this client accepts in a frame from a server. Servers
/// send at most their own payload limit (HELLO_ACK `aux`, 1 MiB by default);
/// this leaves room for servers configured larger.
pub const CLIENT_PAYLOAD_BYTES_MAX: u32 = 64 << 20;

const READ_CHUNK_BYTES: usize = 64 << 10;

/// A frame copied out of the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedFrame {
    pub kind: Kind,
    pub flags: u16,
    pub stream_id: u64,
    pub arg: u32,
    pub aux: u64,
    pub payload: Vec<u8>,
}

impl OwnedFrame {
    /// The payload as text (ERROR messages, HELLO_ACK names), lossy.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// What HELLO_ACK said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloAck {
    pub features: u32,
    pub payload_bytes_max: u64,
    pub server: String,
}

/// The outcome of one generation driven to its END.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: Vec<u8>,
    pub tokens: u64,
    pub frames: u64,
    pub reason: FinishReason,
    /// `aux` of END: total tokens the server says it sent.
    pub end_tokens: u64,
    /// Time to first token and total time as measured by the server.
    pub server_ttft_us: u64,
    pub server_total_us: u64,
    /// As seen by this client, from the write of the REQUEST.
    pub client_ttft: Option<Duration>,
    pub client_total: Duration,
    /// END carried `END_FLAG_FAILED_OVER`: the server's model server
    /// failed mid-stream and the stream continued on another (only when
    /// the connection asked for `FEATURE_FAILOVER_MARK` in HELLO).
    pub failed_over: bool,
}

pub struct Client {
    addr: SocketAddr,
    stream: TcpStream,
    decoder: FrameDecoder,
    rbuf: Box<[u8]>,
    /// Unconsumed bytes of `rbuf` are `rbuf[rpos..rlen]`.
    rpos: usize,
    rlen: usize,
    /// The sending half: a second handle on the same socket.
    tx: Writer,
    timeout: Duration,
    /// Sent with every REQUEST of [`Client::request`] and
    /// [`Client::generate`] (`set_session`).
    session: Option<String>,
}

impl Client {
    /// Connects (bounded by `timeout`); later reads use the same timeout.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<Self, ClientError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                source,
            })?
            .collect();
        let mut last = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => return Self::from_stream(stream, a, timeout),
                Err(source) => last = Some(ClientError::Connect { addr: a, source }),
            }
        }
        Err(last.unwrap_or(ClientError::Connect {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing"),
        }))
    }

    fn from_stream(stream: TcpStream, addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let io = |op| move |source| ClientError::Io { op, addr, source };
        stream.set_nodelay(true).map_err(io("set TCP_NODELAY"))?;
        stream.set_read_timeout(Some(timeout)).map_err(io("set read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("set write timeout"))?;
        let tx = Writer::new(stream.try_clone().map_err(io("clone socket"))?, addr);
        Ok(Self {
            addr,
            stream,
            decoder: FrameDecoder::new(Direction::ToClient, CLIENT_PAYLOAD_BYTES_MAX),
            rbuf: vec![0u8; READ_CHUNK_BYTES].into_boxed_slice(),
            rpos: 0,
            rlen: 0,
            tx,
            timeout,
            session: None,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the timeout of later reads and writes.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        let addr = self.addr;
        let io = |op| move |source| ClientError::Io { op, addr, source };
        self.stream
            .set_read_timeout(Some(timeout))
            .map_err(io("set read timeout"))?;
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(io("set write timeout"))?;
        self.timeout = timeout;
        Ok(())
    }

    /// Connects and completes the handshake; an ERROR answer (401 for a bad
    /// token) comes back as [`ClientError::Server`].
    pub fn connect_hello(
        addr: impl ToSocketAddrs,
        token: &[u8],
        timeout: Duration,
    ) -> Result<(Self, HelloAck), ClientError> {
        let mut c = Self::connect(addr, timeout)?;
        let ack = c.hello(token)?;
        Ok((c, ack))
    }

    /// Sends HELLO (optionally with an auth token) and waits for HELLO_ACK.
    pub fn hello(&mut self, token: &[u8]) -> Result<HelloAck, ClientError> {
        self.hello_features(token, 0)
    }

    /// HELLO asking for protocol features (`cnse_proto::FEATURE_*`); the
    /// answer's `features` are those the server granted.
    pub fn hello_features(&mut self, token: &[u8], features: u32) -> Result<HelloAck, ClientError> {
        self.tx.hello_features(token, features)?;
        let f = self.next_frame()?;
        match f.kind {
            Kind::HelloAck => Ok(HelloAck {
                features: f.arg,
                payload_bytes_max: f.aux,
                server: f.text(),
            }),
            _ => Err(self.unexpected(&f, "HELLO_ACK")),
        }
    }

    fn unexpected(&self, f: &OwnedFrame, wanted: &str) -> ClientError {
        if f.kind == Kind::Error {
            ClientError::Server {
                addr: self.addr,
                stream_id: f.stream_id,
                code: f.arg,
                message: f.text(),
            }
        } else {
            ClientError::Unexpected {
                addr: self.addr,
                what: format!("{:?} on stream {} where {wanted} was expected", f.kind, f.stream_id),
            }
        }
    }

    // Sending goes through the connection's `Writer` (one encoder, one
    // write path for both handles).

    pub fn send_hello(&mut self, token: &[u8]) -> Result<(), ClientError> {
        self.tx.hello(token)
    }

    /// Sends REQUEST on `stream_id` with `credit` tokens of initial credit
    /// (0 = unlimited).
    /// Carries the session key given to [`Client::set_session`], if any.
    pub fn request(&mut self, stream_id: u64, credit: u32, params: &Params, prompt: &str) -> Result<(), ClientError> {
        match &self.session {
            Some(key) => self
                .tx
                .request_with_session(stream_id, credit, params, key.as_bytes(), prompt),
            None => self.tx.request(stream_id, credit, params, prompt),
        }
    }

    /// The session key later requests carry (docs/PROTOCOL.md, "Session
    /// keys": a server with several model servers keeps the conversation
    /// on one); `None` stops sending one. Checked here: 1-256 visible
    /// ASCII characters.
    pub fn set_session(&mut self, key: Option<&str>) -> Result<(), ClientError> {
        if key.is_some_and(|k| !cnse_proto::session_key_valid(k.as_bytes())) {
            return Err(ClientError::InvalidSessionKey);
        }
        self.session = key.map(str::to_string);
        Ok(())
    }

    /// REQUEST with a session key sent as given, unchecked (bad-key tests).
    pub fn request_with_session(
        &mut self,
        stream_id: u64,
        credit: u32,
        params: &Params,
        key: &[u8],
        prompt: &str,
    ) -> Result<(), ClientError> {
        self.tx.request_with_session(stream_id, credit, params, key, prompt)
    }

    /// REQUEST with a raw parameter block and prompt bytes (bad-parameter
    /// tests).
    pub fn request_raw(&mut self, stream_id: u64, credit: u32, payload: &[u8]) -> Result<(), ClientError> {
        self.tx.request_raw(stream_id, credit, payload)
    }

    pub fn credit(&mut self, stream_id: u64, tokens: u32) -> Result<(), ClientError> {
        self.tx.credit(stream_id, tokens)
    }

    pub fn cancel(&mut self, stream_id: u64) -> Result<(), ClientError> {
        self.tx.cancel(stream_id)
    }

    pub fn ping(&mut self, stream_id: u64, arg: u32, aux: u64, payload: &[u8]) -> Result<(), ClientError> {
        self.tx.ping(stream_id, arg, aux, payload)
    }

    /// Writes arbitrary bytes (malformed frames, split headers).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.tx.write_raw(bytes)
    }

    /// Half-closes or closes the socket.
    pub fn shutdown(&self, how: Shutdown) -> Result<(), ClientError> {
        self.stream.shutdown(how).map_err(|source| ClientError::Io {
            op: "shutdown",
            addr: self.addr,
            source,
        })
    }

    /// Reads more bytes into the buffer; Ok(false) on EOF.
    fn fill(&mut self) -> Result<bool, ClientError> {
        if self.rpos == self.rlen {
            self.rpos = 0;
            self.rlen = 0;
        }
        loop {
            match self.stream.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.rlen += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout {
                        addr: self.addr,
                        timeout_ms: self.timeout.as_millis() as u64,
                    })
                }
                Err(source) => {
                    return Err(ClientError::Io {
                        op: "read",
                        addr: self.addr,
                        source,
                    })
                }
            }
        }
    }

    /// The next frame from the server, waiting at most the timeout per read.
    pub fn next_frame(&mut self) -> Result<OwnedFrame, ClientError> {
        loop {
            if let Some(f) = self.buffered_frame()? {
                return Ok(f);
            }
            if !self.fill()? {
                return Err(ClientError::Closed { addr: self.addr });
            }
        }
    }

    /// The next frame if it is already whole in the receive buffer; never
    /// reads. A reader that wakes others once per batch drains these, then
    /// wakes, then blocks in [`Client::next_frame`].
    pub fn buffered_frame(&mut self) -> Result<Option<OwnedFrame>, ClientError> {
        let mut input = &self.rbuf[self.rpos..self.rlen];
        let before = input.len();
        let got = self.decoder.next(&mut input).map(|f| {
            f.map(|f| OwnedFrame {
                kind: f.kind,
                flags: f.header.flags(),
                stream_id: f.header.stream_id(),
                arg: f.header.arg(),
                aux: f.header.aux(),
                payload: f.payload.to_vec(),
            })
        });
        self.rpos += before - input.len();
        got.map_err(|violation| ClientError::Protocol {
            addr: self.addr,
            violation,
        })
    }

    /// The next frame within `timeout` (the socket timeout stays as it was).
    pub fn next_frame_within(&mut self, timeout: Duration) -> Result<OwnedFrame, ClientError> {
        let old = self.timeout;
        self.set_timeout(timeout)?;
        let r = self.next_frame();
        self.set_timeout(old)?;
        r
    }

    /// Reads frames until the server closes the connection; returns the
    /// frames that came first. Fails if the connection is still open after
    /// `within`.
    pub fn read_until_closed(&mut self, within: Duration) -> Result<Vec<OwnedFrame>, ClientError> {
        let deadline = Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout {
                    addr: self.addr,
                    timeout_ms: within.as_millis() as u64,
                });
            }
            match self.next_frame_within(left) {
                Ok(f) => frames.push(f),
                Err(ClientError::Closed { .. }) => return Ok(frames),
                // A reset after the server closed with unread input is a close too.
                Err(ClientError::Io { source, .. }) if source.kind() == std::io::ErrorKind::ConnectionReset => {
                    return Ok(frames)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends a REQUEST and reads its stream to END, calling `on_tokens` for
    /// each TOKENS frame (text, count). `credit` is a window (0 =
    /// unlimited): each time half of it has arrived, that much is granted
    /// again. Frames of other streams are an error here: use
    /// [`Client::next_frame`] to drive several streams at once. An ERROR on
    /// the stream comes back as [`ClientError::Server`].
    pub fn generate(
        &mut self,
        stream_id: u64,
        credit: u32,
        params: &Params,
        prompt: &str,
        mut on_tokens: impl FnMut(&[u8], u32),
    ) -> Result<Generation, ClientError> {
        let sent = Instant::now();
        self.request(stream_id, credit, params, prompt)?;
        let mut text = Vec::new();
        let (mut tokens, mut frames) = (0u64, 0u64);
        let mut client_ttft = None;
        let mut unacked = 0u32;
        loop {
            let f = self.next_frame()?;
            if f.stream_id != stream_id {
                return Err(self.unexpected(&f, "a frame of the request's stream"));
            }
            match f.kind {
                Kind::Tokens => {
                    if f.aux != tokens {
                        return Err(ClientError::Unexpected {
                            addr: self.addr,
                            what: format!("TOKENS starting at index {} after {tokens} tokens", f.aux),
                        });
                    }
                    client_ttft.get_or_insert_with(|| sent.elapsed());
                    tokens += u64::from(f.arg);
                    frames += 1;
                    on_tokens(&f.payload, f.arg);
                    text.extend_from_slice(&f.payload);
                    if credit > 0 {
                        unacked = unacked.saturating_add(f.arg);
                        if unacked >= (credit / 2).max(1) {
                            self.credit(stream_id, unacked)?;
                            unacked = 0;
                        }
                    }
                }
                Kind::End => {
                    let (server_ttft_us, server_total_us) =
                        end_times(&f.payload).ok_or_else(|| ClientError::Unexpected {
                            addr: self.addr,
                            what: format!("END with a {}-byte payload", f.payload.len()),
                        })?;
                    let reason = FinishReason::from_u32(f.arg).ok_or_else(|| ClientError::Unexpected {
                        addr: self.addr,
                        what: format!("END with unknown finish reason {}", f.arg),
                    })?;
                    return Ok(Generation {
                        text,
                        tokens,
                        frames,
                        reason,
                        end_tokens: f.aux,
                        server_ttft_us,
                        server_total_us,
                        client_ttft,
                        client_total: sent.elapsed(),
                        failed_over: f.flags & cnse_proto::END_FLAG_FAILED_OVER != 0,
                    });
                }
                _ => return Err(self.unexpected(&f, "TOKENS or END")),
            }
        }
    }
}

impl Client {
    /// A second handle on the socket for sending, so that one thread can
    /// block in [`Client::next_frame`] while others send (the Python SDK's
    /// reader thread). Socket options (timeouts) are shared by both.
    pub fn writer(&self) -> Result<Writer, ClientError> {
        let stream = self.stream.try_clone().map_err(|source| ClientError::Io {
            op: "clone socket",
            addr: self.addr,
            source,
        })?;
        Ok(Writer::new(stream, self.addr))
    }

    /// Hands over the socket after the handshake (the load generator moves
    /// handshaken connections onto its ring). Fails if the server already
    /// sent bytes beyond what was read as frames.
    pub fn into_stream(self) -> Result<TcpStream, ClientError> {
        if self.rpos != self.rlen || self.decoder.mid_frame() {
            return Err(ClientError::Unexpected {
                addr: self.addr,
                what: "frames before any request".to_string(),
            });
        }
        Ok(self.stream)
    }
}
