//! One client connection's state inside a worker.

use std::time::Instant;

use cnse_proto::{Direction, FrameDecoder};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Slot unused.
    Free,
    /// Accepted; HELLO not yet received.
    Handshake,
    /// HELLO accepted; streams may be opened.
    Open,
    /// A violation was answered: input is ignored, pending output is sent,
    /// then the connection is closed (by `deadline` at the latest).
    Draining { deadline: Instant },
    /// Shut down; waiting for in-flight operations before closing the fd.
    Closing,
}

/// Received bytes a connection may keep unprocessed while its output is
/// backed up; past this its recv is cancelled, so TCP pushes back on the
/// client. Kept in the connection's own buffer, never in a ring buffer.
pub const BACKLOG_BYTES_MAX: usize = 64 * 1024;

/// The connection's receive, as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvOp {
    /// No receive submitted.
    Idle,
    /// A multishot receive is live.
    Armed,
    /// A cancel was submitted; the receive's last completion is due.
    Cancelling,
}

/// The connection's send, as the kernel holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    Idle,
    /// `out_flight[flight_sent..]` is with the kernel: untouched until it
    /// completes.
    InFlight,
}

/// Which protocol a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// The CNSE binary protocol (`--listen`).
    Binary,
    /// HTTP/1.1, the OpenAI-compatible front (`--http-listen`).
    Http,
}

pub struct Conn {
    pub gen: u32,
    pub proto: Proto,
    pub http: crate::http::HttpConn,
    pub fd: libc::c_int,
    pub state: ConnState,
    pub decoder: FrameDecoder,
    /// Output being filled this turn.
    pub out_fill: Vec<u8>,
    /// Output handed to the kernel; untouched until its send completes.
    pub out_flight: Vec<u8>,
    pub flight_sent: usize,
    pub send: SendOp,
    pub recv: RecvOp,
    /// Input received but not yet processed (output backed up).
    pub backlog: Vec<u8>,
    /// (client stream id, stream slot) of the open streams.
    pub streams: Vec<(u64, u32)>,
    pub accepted: Instant,
    pub last_input: Instant,
    pub dirty: bool,
    /// Stage timing: the oldest END in `out_fill` and how many it holds.
    pub fill_first_end: Option<Instant>,
    pub fill_ends: u32,
    /// Stream frames in `out_fill` (`Config::frames_per_send_max`).
    pub fill_frames: u32,
    /// Index in `Tables::conn_live` while the slot is in use.
    pub live_pos: u32,
    /// Capacity of this connection's buffers as last counted into the
    /// worker's memory (`Tables::account_conn`).
    pub held_bytes: usize,
    /// Protocol features granted in HELLO_ACK (`cnse_proto::FEATURE_*`).
    pub features: u32,
}

impl Conn {
    pub fn new(now: Instant, payload_bytes_max: u32) -> Self {
        Self {
            gen: 0,
            proto: Proto::Binary,
            http: crate::http::HttpConn::default(),
            fd: -1,
            state: ConnState::Free,
            decoder: FrameDecoder::new(Direction::ToServer, payload_bytes_max),
            out_fill: Vec::new(),
            out_flight: Vec::new(),
            flight_sent: 0,
            send: SendOp::Idle,
            recv: RecvOp::Idle,
            backlog: Vec::new(),
            streams: Vec::new(),
            accepted: now,
            last_input: now,
            dirty: false,
            fill_first_end: None,
            fill_ends: 0,
            fill_frames: 0,
            live_pos: 0,
            held_bytes: 0,
            features: 0,
        }
    }

    /// Operations the kernel still holds for this connection.
    pub fn ops_in_flight(&self) -> bool {
        self.send != SendOp::Idle || self.recv != RecvOp::Idle
    }

    pub fn conn_ref(&self, slot: u32) -> crate::transport::ConnRef {
        crate::transport::ConnRef {
            slot,
            gen: self.gen,
            fd: self.fd,
        }
    }

    pub fn reads_input(&self) -> bool {
        matches!(self.state, ConnState::Handshake | ConnState::Open)
    }

    /// Capacity its buffers hold now.
    pub fn buffer_bytes(&self) -> usize {
        self.out_fill.capacity()
            + self.out_flight.capacity()
            + self.backlog.capacity()
            + self.decoder.staging_capacity()
            + self.http.capacity()
    }

    pub fn find_stream(&self, client_id: u64) -> Option<usize> {
        self.streams.iter().position(|&(id, _)| id == client_id)
    }
}
