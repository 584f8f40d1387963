use crate::{code, Violation, HEADER_BYTES, MAGIC, VERSION};

/// Frame kinds of version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Request = 0x02,
    Cancel = 0x03,
    Credit = 0x04,
    Ping = 0x05,
    HelloAck = 0x81,
    Tokens = 0x82,
    End = 0x83,
    Error = 0x84,
    Pong = 0x85,
}

impl Kind {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x01 => Self::Hello,
            0x02 => Self::Request,
            0x03 => Self::Cancel,
            0x04 => Self::Credit,
            0x05 => Self::Ping,
            0x81 => Self::HelloAck,
            0x82 => Self::Tokens,
            0x83 => Self::End,
            0x84 => Self::Error,
            0x85 => Self::Pong,
            _ => return None,
        })
    }

    /// Kinds a client sends (and a server accepts).
    pub const fn is_client(self) -> bool {
        (self as u8) < 0x80
    }

    /// Flag bits defined for this kind. The shared contract defines none, so
    /// every other set bit is a violation; `docs/PROTOCOL.md` extensions add
    /// theirs here.
    pub const fn flags_defined(self) -> u16 {
        match self {
            // Extension "Session keys" (`crate::session`).
            Kind::Request => crate::session::REQUEST_FLAG_SESSION_KEY,
            // Extension "Failover marks".
            Kind::End => crate::END_FLAGS_DEFINED,
            _ => 0,
        }
    }
}

/// The 32-byte frame header, viewed in place. Every field is a byte array so
/// the struct has alignment 1 and any 32 bytes are a valid value: a view can
/// be taken at any offset of a receive buffer without copying.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct Header {
    magic: [u8; 4],
    version: u8,
    kind: u8,
    flags: [u8; 2],
    stream_id: [u8; 8],
    payload_len: [u8; 4],
    arg: [u8; 4],
    aux: [u8; 8],
}

impl Header {
    /// Borrows the header at the start of `bytes` in place, or `None` when
    /// fewer than 32 bytes are there.
    #[inline]
    pub fn view(bytes: &[u8]) -> Option<&Header> {
        let head: &[u8; HEADER_BYTES] = bytes.get(..HEADER_BYTES)?.try_into().ok()?;
        Some(Self::from_array(head))
    }

    #[inline]
    pub fn from_array(bytes: &[u8; HEADER_BYTES]) -> &Header {
        // SAFETY: Header is repr(C), 32 bytes (asserted at compile time),
        // alignment 1 and made only of byte arrays, so every 32-byte pattern
        // is a valid Header and any address is suitably aligned. The borrow
        // keeps `bytes` alive and immutable for the view's lifetime.
        unsafe { &*(bytes.as_ptr() as *const Header) }
    }

    pub fn as_bytes(&self) -> &[u8; HEADER_BYTES] {
        // SAFETY: same layout argument as `from_array`, in reverse.
        unsafe { &*(self as *const Header as *const [u8; HEADER_BYTES]) }
    }

    #[inline]
    pub fn magic(&self) -> [u8; 4] {
        self.magic
    }
    #[inline]
    pub fn version(&self) -> u8 {
        self.version
    }
    #[inline]
    pub fn kind_raw(&self) -> u8 {
        self.kind
    }
    /// The kind, when it is one this version defines.
    #[inline]
    pub fn kind(&self) -> Option<Kind> {
        Kind::from_u8(self.kind)
    }
    #[inline]
    pub fn flags(&self) -> u16 {
        u16::from_le_bytes(self.flags)
    }
    #[inline]
    pub fn stream_id(&self) -> u64 {
        u64::from_le_bytes(self.stream_id)
    }
    #[inline]
    pub fn payload_len(&self) -> u32 {
        u32::from_le_bytes(self.payload_len)
    }
    #[inline]
    pub fn arg(&self) -> u32 {
        u32::from_le_bytes(self.arg)
    }
    #[inline]
    pub fn aux(&self) -> u64 {
        u64::from_le_bytes(self.aux)
    }

    /// The page's header checks, in the page's order: magic, version, kind,
    /// flags (400), then payload length (413). `accept` says which side's
    /// kinds are legal here (a server accepts client kinds only).
    pub fn validate(&self, payload_bytes_max: u32, accept: crate::Direction) -> Result<Kind, Violation> {
        if self.magic != MAGIC {
            return Err(Violation::bad("bad magic"));
        }
        if self.version != VERSION {
            return Err(Violation::bad("unsupported version"));
        }
        let kind = match self.kind() {
            Some(k) if k.is_client() == accept.accepts_client_kinds() => k,
            _ => return Err(Violation::bad("unknown frame kind")),
        };
        if self.flags() & !kind.flags_defined() != 0 {
            return Err(Violation::bad("reserved flag bits set"));
        }
        if self.payload_len() > payload_bytes_max {
            return Err(Violation {
                code: code::PAYLOAD_TOO_LARGE,
                message: "payload larger than the limit",
            });
        }
        Ok(kind)
    }
}

impl std::fmt::Debug for Header {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Header")
            .field("magic", &self.magic)
            .field("version", &self.version)
            .field("kind", &format_args!("{:#04x}", self.kind))
            .field("flags", &self.flags())
            .field("stream_id", &self.stream_id())
            .field("payload_len", &self.payload_len())
            .field("arg", &self.arg())
            .field("aux", &self.aux())
            .finish()
    }
}

/// A header being written in place into a send buffer.
pub struct HeaderMut<'a>(&'a mut [u8; HEADER_BYTES]);

impl<'a> HeaderMut<'a> {
    /// Takes the first 32 bytes of `dst`; panics if `dst` is shorter, which
    /// is a bug in the caller's buffer accounting, never user input.
    #[inline]
    pub fn new(dst: &'a mut [u8]) -> Self {
        let head: &mut [u8; HEADER_BYTES] = (&mut dst[..HEADER_BYTES]).try_into().expect("32 bytes");
        Self(head)
    }

    /// Writes every field at once.
    #[inline]
    pub fn set(self, kind: Kind, flags: u16, stream_id: u64, payload_len: u32, arg: u32, aux: u64) {
        let h = self.0;
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = kind as u8;
        h[6..8].copy_from_slice(&flags.to_le_bytes());
        h[8..16].copy_from_slice(&stream_id.to_le_bytes());
        h[16..20].copy_from_slice(&payload_len.to_le_bytes());
        h[20..24].copy_from_slice(&arg.to_le_bytes());
        h[24..32].copy_from_slice(&aux.to_le_bytes());
    }

    /// Writes raw bytes of a possibly invalid header (tests and fuzzers
    /// build bad headers with this).
    pub fn raw(self) -> &'a mut [u8; HEADER_BYTES] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Direction;

    fn hdr(kind: u8, flags: u16, len: u32) -> [u8; 32] {
        let mut b = [0u8; 32];
        HeaderMut::new(&mut b).set(Kind::Ping, flags, 7, len, 9, 11);
        b[5] = kind;
        b
    }

    #[test]
    fn round_trip_fields() {
        let mut b = [0u8; 40];
        HeaderMut::new(&mut b[3..]).set(Kind::Tokens, 0, u64::MAX - 1, 5, 3, 1 << 40);
        let h = Header::view(&b[3..]).unwrap();
        assert_eq!(h.kind(), Some(Kind::Tokens));
        assert_eq!(h.stream_id(), u64::MAX - 1);
        assert_eq!(h.payload_len(), 5);
        assert_eq!(h.arg(), 3);
        assert_eq!(h.aux(), 1 << 40);
        assert_eq!(&h.as_bytes()[..], &b[3..35]);
    }

    #[test]
    fn issue14_end_defines_the_failover_flag_and_no_other() {
        let ok = hdr(Kind::End as u8, crate::END_FLAG_FAILED_OVER, 16);
        assert_eq!(Header::from_array(&ok).validate(64, Direction::ToClient), Ok(Kind::End));
        for flags in [1u16 << 1, 1 << 15] {
            let bad = hdr(Kind::End as u8, flags | crate::END_FLAG_FAILED_OVER, 16);
            let e = Header::from_array(&bad).validate(64, Direction::ToClient).unwrap_err();
            assert_eq!((e.code, e.message), (400, "reserved flag bits set"));
        }
        // Other kinds still define none.
        let tokens = hdr(Kind::Tokens as u8, crate::END_FLAG_FAILED_OVER, 1);
        assert!(Header::from_array(&tokens).validate(64, Direction::ToClient).is_err());
        let mut out = Vec::new();
        crate::put_end(&mut out, 1, crate::FinishReason::Stop, 3, 1, 2);
        crate::set_flags(&mut out, 0, crate::END_FLAG_FAILED_OVER);
        assert_eq!(Header::view(&out).unwrap().flags(), crate::END_FLAG_FAILED_OVER);
    }

    #[test]
    fn checks_run_in_page_order() {
        let mut b = hdr(0x05, 0, 10);
        b[0] = b'X';
        b[4] = 9;
        let e = Header::from_array(&b).validate(1, Direction::ToServer).unwrap_err();
        assert_eq!((e.code, e.message), (400, "bad magic"));
        b[0] = b'C';
        let e = Header::from_array(&b).validate(1, Direction::ToServer).unwrap_err();
        assert_eq!(e.message, "unsupported version");
        b[4] = 1;
        b[5] = 0x77;
        b[6] = 1;
        let e = Header::from_array(&b).validate(1, Direction::ToServer).unwrap_err();
        assert_eq!(e.message, "unknown frame kind");
        b[5] = 0x05;
        let e = Header::from_array(&b).validate(1, Direction::ToServer).unwrap_err();
        assert_eq!(e.message, "reserved flag bits set");
        b[6] = 0;
        let e = Header::from_array(&b).validate(1, Direction::ToServer).unwrap_err();
        assert_eq!(e.code, 413);
        assert_eq!(Header::from_array(&b).validate(10, Direction::ToServer), Ok(Kind::Ping));
    }

    #[test]
    fn server_kinds_rejected_from_clients() {
        let b = hdr(0x82, 0, 0);
        assert_eq!(
            Header::from_array(&b)
                .validate(0, Direction::ToServer)
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(
            Header::from_array(&b).validate(0, Direction::ToClient),
            Ok(Kind::Tokens)
        );
        let b = hdr(0x02, 0, 0);
        assert!(Header::from_array(&b).validate(0, Direction::ToClient).is_err());
    }

    #[test]
    fn four_gib_length_is_413() {
        let b = hdr(0x05, 0, u32::MAX);
        let e = Header::from_array(&b)
            .validate(1 << 20, Direction::ToServer)
            .unwrap_err();
        assert_eq!(e.code, 413);
    }
}
