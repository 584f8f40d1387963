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
    pub streams: ConnStreams,
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
            streams: ConnStreams::default(),
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
        self.streams.find(client_id)
    }
}

/// A connection's open streams as (client stream id, stream slot), in no
/// order, with a filter of the ids added since the list was last empty:
/// a REQUEST's check for a stream id in use, which every request makes,
/// skips the walk when its id's bit is clear (a connection with 64
/// requests in flight walked 32 entries per request). 256 bits: with 64
/// ids in, a new id's bit is clear about 78 % of the time (with 64 bits,
/// 37 %).
#[derive(Debug, Default)]
pub struct ConnStreams {
    list: Vec<(u64, u32)>,
    /// One bit per id hash; never cleared but with the list emptied, so
    /// a set bit may be stale (then the walk decides).
    seen: [u64; 4],
}

impl ConnStreams {
    /// The filter word and bit of `id`.
    fn bit(id: u64) -> (usize, u64) {
        let h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56;
        ((h >> 6) as usize, 1 << (h & 63))
    }

    /// Position of the stream the client calls `id`.
    pub fn find(&self, id: u64) -> Option<usize> {
        let (w, b) = Self::bit(id);
        if self.seen[w] & b == 0 {
            return None;
        }
        self.list.iter().position(|&(c, _)| c == id)
    }

    pub fn push(&mut self, id: u64, slot: u32) {
        let (w, b) = Self::bit(id);
        self.seen[w] |= b;
        self.list.push((id, slot));
    }

    /// Removes entry `k` (the last takes its place).
    pub fn swap_remove(&mut self, k: usize) -> (u64, u32) {
        let e = self.list.swap_remove(k);
        self.forget_if_empty();
        e
    }

    pub fn pop(&mut self) -> Option<(u64, u32)> {
        let e = self.list.pop();
        self.forget_if_empty();
        e
    }

    pub fn clear(&mut self) {
        self.list.clear();
        self.seen = [0; 4];
    }

    fn forget_if_empty(&mut self) {
        if self.list.is_empty() {
            self.seen = [0; 4];
        }
    }
}

impl std::ops::Deref for ConnStreams {
    type Target = [(u64, u32)];

    fn deref(&self) -> &[(u64, u32)] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::ConnStreams;

    #[test]
    fn streams_are_found_by_id_whatever_the_filter_says() {
        let mut s = ConnStreams::default();
        // Ids that share filter bits (more ids than bits), removed in
        // every order.
        for id in 0..400u64 {
            s.push(id * 3, id as u32);
        }
        for id in 0..400u64 {
            assert_eq!(s.find(id * 3).map(|k| s[k]), Some((id * 3, id as u32)));
        }
        assert_eq!(s.find(1), None);
        for id in (0..400u64).step_by(2) {
            let k = s.find(id * 3).expect("present");
            assert_eq!(s.swap_remove(k), (id * 3, id as u32));
            assert_eq!(s.find(id * 3), None, "gone once removed");
        }
        assert_eq!(s.len(), 200);
        for id in (1..400u64).step_by(2) {
            assert_eq!(s.find(id * 3).map(|k| s[k]), Some((id * 3, id as u32)));
        }
        while s.pop().is_some() {}
        assert_eq!(s.seen, [0; 4], "an empty list forgets its ids");
        s.push(7, 1);
        assert_eq!(s.find(7), Some(0));
        s.clear();
        assert_eq!(s.find(7), None);
    }
}
