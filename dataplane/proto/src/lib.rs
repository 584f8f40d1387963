//! CNSE wire protocol, version 1: pure code, no I/O.
//!
//! Every frame is a fixed 32-byte [`Header`] followed by `payload_len` bytes.
//! Headers are viewed in place in the receive buffer ([`Header::view`]) and
//! written in place into send buffers ([`HeaderMut`]); nothing here allocates
//! per frame. [`FrameDecoder`] cuts a byte stream that arrives in arbitrary
//! pieces into frames, and is what the fuzzers drive.

mod decoder;
mod encode;
mod header;
mod params;
mod session;

pub use decoder::{Direction, Frame, FrameDecoder};
pub use encode::*;
pub use header::{Header, HeaderMut, Kind};
pub use params::{ParamLimits, Params, Request};
pub use session::{
    parse_request, put_request_with_session, session_key_valid, REQUEST_FLAG_SESSION_KEY, SESSION_KEY_BYTES_MAX,
};

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"CNSE";
/// The only protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of every frame header.
pub const HEADER_BYTES: usize = 32;
/// Size of the REQUEST parameter block at the start of its payload.
pub const PARAMS_BYTES: usize = 32;
/// Size of the END payload: ttft_us (u64) then total_us (u64).
pub const END_PAYLOAD_BYTES: usize = 16;
/// Default limit on `payload_len` (1 MiB).
pub const PAYLOAD_BYTES_MAX_DEFAULT: u32 = 1 << 20;
/// Default limit on `max_tokens`; the page requires at least 65,536.
pub const MAX_TOKENS_LIMIT_DEFAULT: u32 = 65_536;

/// Protocol feature: failover marks (docs/PROTOCOL.md, "Failover
/// marks"). A client sets this bit in HELLO's `arg` (features wanted); the
/// server grants it in HELLO_ACK's `arg` (server features) and then sets
/// [`END_FLAG_FAILED_OVER`] on streams that continued on another model
/// server. Clients that did not ask get the same streams unmarked.
pub const FEATURE_FAILOVER_MARK: u32 = 1 << 0;
/// Every protocol feature bit this crate defines (HELLO `arg`).
pub const FEATURES_DEFINED: u32 = FEATURE_FAILOVER_MARK;
/// END flag bit 0: the stream's backend failed after tokens were sent and
/// the stream continued on another server from its text so far. Set only
/// for a connection granted [`FEATURE_FAILOVER_MARK`].
pub const END_FLAG_FAILED_OVER: u16 = 1 << 0;
/// Flag bits defined for END.
pub const END_FLAGS_DEFINED: u16 = END_FLAG_FAILED_OVER;

/// Protocol error codes (the page's table).
pub mod code {
    pub const BAD_REQUEST: u32 = 400;
    pub const UNAUTHORIZED: u32 = 401;
    pub const NOT_FOUND: u32 = 404;
    pub const STREAM_IN_USE: u32 = 409;
    pub const PAYLOAD_TOO_LARGE: u32 = 413;
    pub const OVERLOADED: u32 = 429;
    pub const INTERNAL: u32 = 500;
    pub const BACKEND_FAILED: u32 = 502;
    pub const SHUTTING_DOWN: u32 = 503;
    pub const BACKEND_TIMEOUT: u32 = 504;
}

/// END finish reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length = 0,
    /// The model stopped on its own.
    Stop = 1,
    /// The client cancelled.
    Cancelled = 2,
}

impl FinishReason {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Length),
            1 => Some(Self::Stop),
            2 => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// A protocol violation: the receiver answers with ERROR `code` on stream 0
/// and closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("protocol violation {code}: {message}")]
pub struct Violation {
    pub code: u32,
    pub message: &'static str,
}

impl Violation {
    pub const fn bad(message: &'static str) -> Self {
        Self {
            code: code::BAD_REQUEST,
            message,
        }
    }
}

const _: () = assert!(HEADER_BYTES == 32);
const _: () = assert!(std::mem::size_of::<Header>() == HEADER_BYTES);
const _: () = assert!(std::mem::align_of::<Header>() == 1);
