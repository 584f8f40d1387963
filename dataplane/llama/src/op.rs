//! The ring operations of a pooled connection, one place per opcode: tags
//! and entry builders. Each connection slot has at most one of CONNECT,
//! SEND, RECV, CLOSE in flight; an ASYNC_CANCEL may be issued beside it and
//! its completion carries no state.

use std::os::fd::RawFd;

use cnse_ring::{opcode, squeue::Entry, types};

/// Kind of a submitted operation, the low bits of its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    Connect = 1,
    Send = 2,
    Recv = 3,
    Close = 4,
    /// ASYNC_CANCEL of whatever is in flight on a connection's fd.
    Cancel = 5,
    /// NOP whose completion brings a resumed stream's buffered events back
    /// to `complete`, where a sink is at hand.
    Wake = 6,
}

const KIND_BITS: u32 = 4;
/// Tags are the backend's own 56 bits (the loop keeps the rest).
const TAG_BITS: u32 = 56;
pub(crate) const SLOTS_MAX: usize = 1 << 20;
const _: () = assert!((SLOTS_MAX as u64) << KIND_BITS < 1u64 << TAG_BITS);

pub(crate) fn tag(slot: usize, kind: OpKind) -> u64 {
    assert!(slot < SLOTS_MAX);
    ((slot as u64) << KIND_BITS) | kind as u64
}

/// `(slot, kind)` of a tag this crate made; `None` for anything else.
pub(crate) fn untag(tag: u64) -> Option<(usize, OpKind)> {
    let kind = match tag & ((1 << KIND_BITS) - 1) {
        1 => OpKind::Connect,
        2 => OpKind::Send,
        3 => OpKind::Recv,
        4 => OpKind::Close,
        5 => OpKind::Cancel,
        6 => OpKind::Wake,
        _ => return None,
    };
    let slot = usize::try_from(tag >> KIND_BITS).ok()?;
    (slot < SLOTS_MAX).then_some((slot, kind))
}

/// A socket address in the form the kernel reads, kept at a stable address
/// for the whole CONNECT.
pub(crate) struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

impl SockAddr {
    pub(crate) fn new(addr: std::net::SocketAddr) -> Self {
        let (storage, len) = cnse_backend::sys::sockaddr(addr);
        Self {
            storage,
            len: len as libc::socklen_t,
        }
    }

    pub(crate) fn family(&self) -> libc::c_int {
        libc::c_int::from(self.storage.ss_family)
    }
}

/// A nonblocking, close-on-exec TCP socket with Nagle off (requests and
/// their answers are latency-bound).
pub(crate) fn socket(addr: &SockAddr) -> std::io::Result<RawFd> {
    // SAFETY: plain syscall with constant arguments.
    let fd = unsafe {
        libc::socket(
            addr.family(),
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    // SAFETY: fd is a socket we own; the option value outlives the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: fd is ours and not shared with the ring yet.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    Ok(fd)
}

/// CONNECT. The address must stay valid and unmoved until the completion.
pub(crate) fn connect(fd: RawFd, addr: &SockAddr) -> Entry {
    opcode::Connect::new(
        types::Fd(fd),
        &addr.storage as *const _ as *const libc::sockaddr,
        addr.len,
    )
    .build()
}

/// SEND of `buf` without SIGPIPE. `buf` must stay valid and unmoved until
/// the completion.
pub(crate) fn send(fd: RawFd, buf: &[u8]) -> Entry {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    opcode::Send::new(types::Fd(fd), buf.as_ptr(), len)
        .flags(libc::MSG_NOSIGNAL)
        .build()
}

/// RECV into `buf`, which must stay valid, unmoved and untouched until the
/// completion.
pub(crate) fn recv(fd: RawFd, buf: &mut [u8]) -> Entry {
    let len = u32::try_from(buf.len()).unwrap_or(u32::MAX);
    opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), len).build()
}

pub(crate) fn close(fd: RawFd) -> Entry {
    opcode::Close::new(types::Fd(fd)).build()
}

/// Cancels every operation in flight on `fd` (the loop rewrites user_data,
/// so cancelling by fd is the handle this backend has).
pub(crate) fn cancel_fd(fd: RawFd) -> Entry {
    opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build()
}

pub(crate) fn nop() -> Entry {
    opcode::Nop::new().build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for slot in [0, 1, 77, SLOTS_MAX - 1] {
            for kind in [
                OpKind::Connect,
                OpKind::Send,
                OpKind::Recv,
                OpKind::Close,
                OpKind::Cancel,
                OpKind::Wake,
            ] {
                assert_eq!(untag(tag(slot, kind)), Some((slot, kind)));
            }
        }
        assert_eq!(untag(0), None);
        assert_eq!(untag(15), None);
    }
}
