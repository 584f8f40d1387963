use std::net::SocketAddr;

/// Everything a client operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on connection to {addr}: {source}")]
    Io {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("no frame from {addr} within {timeout_ms} ms")]
    Timeout { addr: SocketAddr, timeout_ms: u64 },
    #[error("connection to {addr} closed by the server")]
    Closed { addr: SocketAddr },
    #[error("server {addr} sent an invalid frame: {violation}")]
    Protocol {
        addr: SocketAddr,
        violation: cnse_proto::Violation,
    },
    #[error("server {addr} answered ERROR {code} on stream {stream_id}: {message}")]
    Server {
        addr: SocketAddr,
        stream_id: u64,
        code: u32,
        message: String,
    },
    #[error("server {addr} sent {what}")]
    Unexpected { addr: SocketAddr, what: String },
    #[error("invalid session key: 1-256 visible ASCII characters (0x21-0x7e) expected")]
    InvalidSessionKey,
    #[error("load generator: {0}")]
    Load(String),
    /// A ring operation failed (the operation and the errno are in it).
    #[error(transparent)]
    Ring(#[from] cnse_ring::RingError),
}
