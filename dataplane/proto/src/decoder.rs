use crate::{Header, Kind, Violation, HEADER_BYTES};

/// Which side's frames a decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Frames a server receives: client kinds only.
    ToServer,
    /// Frames a client receives: server kinds only.
    ToClient,
}

impl Direction {
    pub(crate) fn accepts_client_kinds(self) -> bool {
        self == Direction::ToServer
    }
}

/// One whole frame, borrowed either in place from the input or from the
/// decoder's staging area when it straddled input pieces.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub kind: Kind,
    pub header: &'a Header,
    pub payload: &'a [u8],
    /// The payload would have needed more staging than the limit allowed
    /// (`set_staging_limit`): it was discarded as it arrived and `payload`
    /// is empty. The receiver answers the frame without its payload (for
    /// example ERROR 429 on a REQUEST).
    pub skipped: bool,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload {
        kind: Kind,
        need: usize,
    },
    /// Discarding a payload that the staging limit did not allow.
    Skip {
        kind: Kind,
        left: usize,
    },
    Failed(Violation),
}

/// Cuts a byte stream into frames, whatever the sizes of the pieces it
/// arrives in.
///
/// A frame wholly inside one input piece is returned in place (no copy).
/// Only a header split across pieces is staged (32 bytes), and only a payload
/// split across pieces is copied into a buffer that is reused from frame to
/// frame. That buffer is reserved only after the header passed the payload
/// limit check, so a hostile `payload_len` never causes an allocation larger
/// than the limit.
pub struct FrameDecoder {
    dir: Direction,
    payload_bytes_max: u32,
    stage: [u8; HEADER_BYTES],
    staged: usize,
    payload: Vec<u8>,
    state: State,
    /// The last frame returned borrowed the staging area; clear it on the
    /// next call (the borrow has ended by then).
    release: bool,
    /// Most payload bytes one frame may stage (frames that arrive whole
    /// are never staged).
    staging_limit: usize,
}

impl FrameDecoder {
    pub fn new(dir: Direction, payload_bytes_max: u32) -> Self {
        Self {
            dir,
            payload_bytes_max,
            stage: [0; HEADER_BYTES],
            staged: 0,
            payload: Vec::new(),
            state: State::Header,
            release: false,
            staging_limit: usize::MAX,
        }
    }

    /// Payload bytes a frame split across inputs may stage from now on;
    /// a frame that would need more is skipped (see `Frame::skipped`).
    pub fn set_staging_limit(&mut self, bytes: usize) {
        self.staging_limit = bytes;
    }

    /// Gives back staging capacity above `keep` bytes between frames (a
    /// 1 MiB prompt should not pin 1 MiB per connection for good).
    pub fn shrink_staging(&mut self, keep: usize) {
        if !self.mid_frame() && self.payload.capacity() > keep {
            self.payload = Vec::new();
            self.release = false;
            self.staged = 0;
        }
    }

    /// Forgets any partial frame and a past violation (connection slot reuse).
    /// Keeps the payload buffer's capacity.
    pub fn reset(&mut self) {
        self.staged = 0;
        self.payload.clear();
        self.state = State::Header;
        self.release = false;
    }

    /// True when bytes of an unfinished frame are held.
    pub fn mid_frame(&self) -> bool {
        !self.release && (self.staged > 0 || matches!(self.state, State::Payload { .. } | State::Skip { .. }))
    }

    /// Bytes of payload staging currently reserved (for bounds tests).
    pub fn staging_capacity(&self) -> usize {
        self.payload.capacity()
    }

    fn check(&mut self, h: &Header) -> Result<Kind, Violation> {
        h.validate(self.payload_bytes_max, self.dir)
            .inspect_err(|&v| self.state = State::Failed(v))
    }

    /// Returns the next whole frame, consuming its bytes from the front of
    /// `input`; `Ok(None)` means `input` is used up and more bytes are needed.
    /// After a violation every later call returns the same violation.
    pub fn next<'f, 'i: 'f>(&'f mut self, input: &mut &'i [u8]) -> Result<Option<Frame<'f>>, Violation> {
        if let State::Failed(v) = self.state {
            return Err(v);
        }
        if self.release {
            self.release = false;
            self.staged = 0;
            self.payload.clear();
        }
        if let State::Header = self.state {
            if self.staged == 0 && input.len() >= HEADER_BYTES {
                let whole: &'i [u8] = input;
                let h = Header::view(whole).expect("32 bytes present");
                let kind = self.check(h)?;
                let end = HEADER_BYTES + h.payload_len() as usize;
                if whole.len() >= end {
                    *input = &whole[end..];
                    return Ok(Some(Frame {
                        kind,
                        header: h,
                        payload: &whole[HEADER_BYTES..end],
                        skipped: false,
                    }));
                }
                self.stage.copy_from_slice(&whole[..HEADER_BYTES]);
                self.staged = HEADER_BYTES;
                *input = &whole[HEADER_BYTES..];
                self.begin_payload(kind, end - HEADER_BYTES);
            } else {
                let take = (HEADER_BYTES - self.staged).min(input.len());
                self.stage[self.staged..self.staged + take].copy_from_slice(&input[..take]);
                self.staged += take;
                *input = &input[take..];
                if self.staged < HEADER_BYTES {
                    return Ok(None);
                }
                let stage = self.stage;
                let h = Header::from_array(&stage);
                let kind = self.check(h)?;
                let need = h.payload_len() as usize;
                if input.len() >= need {
                    // Header was split, payload is whole: borrow it in place.
                    let whole: &'i [u8] = input;
                    *input = &whole[need..];
                    self.release = true;
                    return Ok(Some(Frame {
                        kind,
                        header: Header::from_array(&self.stage),
                        payload: &whole[..need],
                        skipped: false,
                    }));
                }
                self.begin_payload(kind, need);
            }
        }
        if let State::Skip { kind, left } = self.state {
            let take = left.min(input.len());
            *input = &input[take..];
            if take < left {
                self.state = State::Skip {
                    kind,
                    left: left - take,
                };
                return Ok(None);
            }
            self.state = State::Header;
            self.release = true;
            return Ok(Some(Frame {
                kind,
                header: Header::from_array(&self.stage),
                payload: &[],
                skipped: true,
            }));
        }
        let State::Payload { kind, need } = self.state else {
            unreachable!("header state either returned or moved to payload")
        };
        let take = (need - self.payload.len()).min(input.len());
        self.payload.extend_from_slice(&input[..take]);
        *input = &input[take..];
        if self.payload.len() < need {
            return Ok(None);
        }
        self.state = State::Header;
        self.release = true;
        Ok(Some(Frame {
            kind,
            header: Header::from_array(&self.stage),
            payload: &self.payload,
            skipped: false,
        }))
    }

    fn begin_payload(&mut self, kind: Kind, need: usize) {
        debug_assert!(need <= self.payload_bytes_max as usize);
        if need > self.staging_limit {
            self.payload.clear();
            self.state = State::Skip { kind, left: need };
            return;
        }
        self.payload.clear();
        // Exact: amortized growth could reserve up to twice the limit.
        self.payload.reserve_exact(need);
        self.state = State::Payload { kind, need };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn stream() -> Vec<u8> {
        let mut v = Vec::new();
        put_hello(&mut v, b"key");
        put_request(&mut v, 1, 3, &Params::default(), "prompt ünïcode".as_bytes());
        put_ping(&mut v, 0, 5, 6, &[9u8; 100]);
        put_credit(&mut v, 1, 4);
        put_cancel(&mut v, 1);
        v
    }

    fn decode_in_pieces(bytes: &[u8], piece: usize) -> Vec<(Kind, u64, u32, Vec<u8>)> {
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            let mut input = chunk;
            while let Some(f) = d.next(&mut input).unwrap() {
                out.push((f.kind, f.header.stream_id(), f.header.arg(), f.payload.to_vec()));
            }
            assert!(input.is_empty());
        }
        assert!(!d.mid_frame());
        out
    }

    #[test]
    fn a_split_frame_over_the_staging_limit_is_skipped_and_the_next_one_decodes() {
        let mut bytes = Vec::new();
        put_request(&mut bytes, 7, 0, &Params::default(), &[b'x'; 5000]);
        put_ping(&mut bytes, 0, 1, 2, b"after");
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        d.set_staging_limit(1024);
        let mut seen = Vec::new();
        for chunk in bytes.chunks(700) {
            let mut input = chunk;
            while let Some(f) = d.next(&mut input).unwrap() {
                seen.push((f.kind, f.header.stream_id(), f.skipped, f.payload.to_vec()));
            }
        }
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].0, seen[0].1, seen[0].2), (Kind::Request, 7, true));
        assert!(seen[0].3.is_empty());
        assert!(d.staging_capacity() <= 1024, "staged {} bytes", d.staging_capacity());
        assert_eq!(
            (seen[1].0, seen[1].2, seen[1].3.as_slice()),
            (Kind::Ping, false, &b"after"[..])
        );
        // Whole frames are never staged, so the limit does not apply.
        let mut input = bytes.as_slice();
        let f = d.next(&mut input).unwrap().unwrap();
        assert!(!f.skipped && f.payload.len() > 5000);
    }

    #[test]
    fn staging_capacity_is_given_back_between_frames() {
        let mut bytes = Vec::new();
        put_request(&mut bytes, 1, 0, &Params::default(), &[b'x'; 200_000]);
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        for chunk in bytes.chunks(16 * 1024) {
            let mut input = chunk;
            while let Some(f) = d.next(&mut input).unwrap() {
                assert!(f.payload.len() > 200_000);
            }
        }
        assert!(d.staging_capacity() >= 200_000);
        d.shrink_staging(64 * 1024);
        assert_eq!(d.staging_capacity(), 0);
    }

    #[test]
    fn any_split_gives_same_frames() {
        let bytes = stream();
        let whole = decode_in_pieces(&bytes, bytes.len());
        assert_eq!(whole.len(), 5);
        assert_eq!(whole[0].3, b"key");
        assert_eq!(whole[3], (Kind::Credit, 1, 4, vec![]));
        for piece in 1..=bytes.len() {
            assert_eq!(decode_in_pieces(&bytes, piece), whole, "piece size {piece}");
        }
    }

    #[test]
    fn huge_length_rejected_before_allocation() {
        let mut b = [0u8; 32];
        HeaderMut::new(&mut b).set(Kind::Ping, 0, 0, u32::MAX, 0, 0);
        let mut d = FrameDecoder::new(Direction::ToServer, 1 << 20);
        let mut input = &b[..];
        assert_eq!(d.next(&mut input).unwrap_err().code, 413);
        assert_eq!(d.staging_capacity(), 0);
        let mut more: &[u8] = &[1, 2, 3];
        assert_eq!(d.next(&mut more).unwrap_err().code, 413, "stays failed");
    }

    #[test]
    fn split_bad_header_detected_once_whole() {
        let mut b = [0u8; 32];
        HeaderMut::new(&mut b).set(Kind::Ping, 0, 0, 0, 0, 0);
        b[0] = b'X';
        let mut d = FrameDecoder::new(Direction::ToServer, 64);
        let mut first = &b[..10];
        assert!(d.next(&mut first).unwrap().is_none());
        let mut rest = &b[10..];
        assert_eq!(d.next(&mut rest).unwrap_err().message, "bad magic");
    }
}
