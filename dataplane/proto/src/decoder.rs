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
}

#[derive(Debug, Clone, Copy)]
enum State {
    Header,
    Payload { kind: Kind, need: usize },
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
        !self.release && (self.staged > 0 || matches!(self.state, State::Payload { .. }))
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
                    }));
                }
                self.begin_payload(kind, need);
            }
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
        }))
    }

    fn begin_payload(&mut self, kind: Kind, need: usize) {
        debug_assert!(need <= self.payload_bytes_max as usize);
        self.payload.clear();
        self.payload.reserve(need);
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
