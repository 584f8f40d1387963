//! CNSE v1 clients.
//!
//! - [`Client`]: a blocking client over `std::net::TcpStream` with read
//!   timeouts, for `cnse-dp client`, for tests (it can also write raw bytes,
//!   malformed headers included) and for the load generator's handshakes.
//! - [`load`]: the load generator behind `cnse-dp bench` and `cnse-dp demo`:
//!   N connections × K streams in flight over io_uring, one ring per client
//!   thread, closed or open loop, latency histograms merged at the end.
//! - [`Writer`]: the sending half of a [`Client`] ([`Client::writer`]), for
//!   programs that read on one thread and send from others (the Python SDK
//!   in `dataplane/python`).

mod blocking;
mod error;
pub mod load;
mod writer;

pub use blocking::{Client, Generation, HelloAck, OwnedFrame, CLIENT_PAYLOAD_BYTES_MAX};
pub use error::ClientError;
pub use writer::Writer;
