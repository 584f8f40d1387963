//! The sending half of a handshaken connection ([`Client::writer`]): frames
//! are encoded by the protocol crate into one buffer and written whole, so
//! frames from different callers never interleave when the owner serialises
//! calls (a mutex in the Python SDK).
//!
//! [`Client::writer`]: crate::Client::writer

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use cnse_proto::{
    put_cancel, put_credit, put_frame, put_hello_features, put_ping, put_request, put_request_with_session, Kind,
    Params,
};

use crate::ClientError;

pub struct Writer {
    addr: SocketAddr,
    stream: TcpStream,
    out: Vec<u8>,
}

impl Writer {
    pub(crate) fn new(stream: TcpStream, addr: SocketAddr) -> Self {
        Self {
            addr,
            stream,
            out: Vec::with_capacity(4096),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn flush_out(&mut self) -> Result<(), ClientError> {
        let r = self.stream.write_all(&self.out);
        self.out.clear();
        r.map_err(|source| ClientError::Io {
            op: "write",
            addr: self.addr,
            source,
        })
    }

    /// HELLO with an optional auth token.
    pub fn hello(&mut self, token: &[u8]) -> Result<(), ClientError> {
        self.hello_features(token, 0)
    }

    /// HELLO asking for protocol features (`cnse_proto::FEATURE_*`).
    pub fn hello_features(&mut self, token: &[u8], features: u32) -> Result<(), ClientError> {
        put_hello_features(&mut self.out, token, features);
        self.flush_out()
    }

    /// REQUEST with a raw parameter block and prompt bytes.
    pub fn request_raw(&mut self, stream_id: u64, credit: u32, payload: &[u8]) -> Result<(), ClientError> {
        put_frame(&mut self.out, Kind::Request, stream_id, credit, 0, &[payload]);
        self.flush_out()
    }

    /// Arbitrary bytes (malformed frames, split headers).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.out.extend_from_slice(bytes);
        self.flush_out()
    }

    /// REQUEST on `stream_id` with `credit` tokens of initial credit (0 =
    /// unlimited). The caller keeps the prompt within the server's payload
    /// limit (HELLO_ACK `aux`): a larger frame is a violation that closes
    /// the connection.
    pub fn request(&mut self, stream_id: u64, credit: u32, params: &Params, prompt: &str) -> Result<(), ClientError> {
        put_request(&mut self.out, stream_id, credit, params, prompt.as_bytes());
        self.flush_out()
    }

    /// REQUEST carrying a session key (docs/PROTOCOL.md, "Session keys"),
    /// sent as given: a server answers ERROR 400 on the stream to a key
    /// that is not 1-256 visible ASCII bytes.
    pub fn request_with_session(
        &mut self,
        stream_id: u64,
        credit: u32,
        params: &Params,
        key: &[u8],
        prompt: &str,
    ) -> Result<(), ClientError> {
        put_request_with_session(&mut self.out, stream_id, credit, params, key, prompt.as_bytes());
        self.flush_out()
    }

    pub fn credit(&mut self, stream_id: u64, tokens: u32) -> Result<(), ClientError> {
        put_credit(&mut self.out, stream_id, tokens);
        self.flush_out()
    }

    pub fn cancel(&mut self, stream_id: u64) -> Result<(), ClientError> {
        put_cancel(&mut self.out, stream_id);
        self.flush_out()
    }

    pub fn ping(&mut self, stream_id: u64, arg: u32, aux: u64, payload: &[u8]) -> Result<(), ClientError> {
        put_ping(&mut self.out, stream_id, arg, aux, payload);
        self.flush_out()
    }

    /// Bounds later writes. The socket is shared with the [`Client`] it came
    /// from: this changes that handle's write timeout too (read timeouts are
    /// left as they are).
    ///
    /// [`Client`]: crate::Client
    pub fn set_write_timeout(&self, timeout: Duration) -> Result<(), ClientError> {
        self.stream
            .set_write_timeout(Some(timeout))
            .map_err(|source| ClientError::Io {
                op: "set write timeout",
                addr: self.addr,
                source,
            })
    }

    /// Closes both directions: a reader blocked on the other handle sees
    /// the end of the stream.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.stream.shutdown(Shutdown::Both).map_err(|source| ClientError::Io {
            op: "shutdown",
            addr: self.addr,
            source,
        })
    }
}
