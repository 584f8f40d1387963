//! Everything the SDK can fail with, before it becomes a Python exception
//! (`py.rs` maps each variant onto the classes of `cnse/_errors.py`). It is
//! `Clone` because one connection failure ends every open stream.

use cnse_client::ClientError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SdkError {
    /// The server answered ERROR `code` (on a stream, or on stream 0 for the
    /// connection).
    Server { code: u32, stream_id: u64, message: String },
    /// Refused by this client before anything was sent, with the code the
    /// server would have answered (413 prompt over the payload limit, 429
    /// too many streams or pings in flight).
    Local { code: u32, message: String },
    /// Connecting or the handshake failed (refused, unreachable, no
    /// HELLO_ACK in time).
    Connect(String),
    /// The connection broke: the server closed it, reset it, or a write
    /// failed.
    Lost(String),
    /// Nothing arrived for a waiting stream or ping within the timeout.
    Timeout(String),
    /// The server sent something the protocol does not allow.
    Protocol(String),
    /// The client was closed by its owner.
    Closed,
    /// A bad argument (window out of range, a released stream).
    Usage(String),
}

impl SdkError {
    /// An error of the connection's reader or handshake.
    pub fn from_client(e: ClientError, connecting: bool) -> SdkError {
        match e {
            ClientError::Server {
                stream_id,
                code,
                message,
                ..
            } => SdkError::Server {
                code,
                stream_id,
                message,
            },
            ClientError::Timeout { .. } => SdkError::Timeout(e.to_string()),
            ClientError::Protocol { .. } | ClientError::Unexpected { .. } => SdkError::Protocol(e.to_string()),
            e if connecting => SdkError::Connect(e.to_string()),
            e => SdkError::Lost(e.to_string()),
        }
    }
}

impl std::fmt::Display for SdkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SdkError::Server {
                code,
                stream_id: 0,
                message,
            } => write!(f, "server answered ERROR {code} on the connection: {message}"),
            SdkError::Server {
                code,
                stream_id,
                message,
            } => write!(f, "server answered ERROR {code} on stream {stream_id}: {message}"),
            SdkError::Local { code, message } => write!(f, "{message} (refused by the client, code {code})"),
            SdkError::Connect(m) | SdkError::Lost(m) | SdkError::Timeout(m) | SdkError::Protocol(m) => f.write_str(m),
            SdkError::Usage(m) => f.write_str(m),
            SdkError::Closed => f.write_str("the client is closed"),
        }
    }
}
