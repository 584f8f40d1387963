//! Listener sockets: one per worker on the same address with SO_REUSEPORT,
//! so the kernel spreads incoming connections over the workers.

use std::io;
use std::mem::size_of;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::ServerError;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn set_int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: fd is open; the option value is a valid c_int of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn bind_one(addr: SocketAddr, reuseport: bool) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the result is checked and owned below.
    let raw = cvt(unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: raw is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuseport {
        set_int_opt(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let (storage, len) = cnse_backend::sys::sockaddr(addr);
    // SAFETY: storage holds a sockaddr of `len` bytes.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&storage as *const libc::sockaddr_storage).cast(), len) })?;
    if !reuseport {
        return Ok(fd);
    }
    // SAFETY: fd is a bound stream socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), 4096) })?;
    Ok(fd)
}

/// Binds `count` listeners to `addr`. When the port is 0 the first bind
/// picks it and the others join that port.
///
/// SO_REUSEPORT would also let a second server process join a port that is
/// already serving, silently splitting its connections; a plain bind first
/// (released before the real ones) turns that into "address in use" unless
/// `join` asks for exactly that split (several processes on one address,
/// for example to hold more connections than one process's open-file
/// limit allows).
pub(crate) fn bind_reuseport(addr: SocketAddr, count: usize, join: bool) -> Result<Vec<OwnedFd>, ServerError> {
    let bind_err = |addr| move |error| ServerError::Bind { addr, error };
    let bound = if join && addr.port() != 0 {
        addr
    } else {
        let probe = bind_one(addr, false).map_err(bind_err(addr))?;
        let bound = local_addr(&probe).map_err(bind_err(addr))?;
        drop(probe);
        bound
    };
    (0..count)
        .map(|_| bind_one(bound, true).map_err(bind_err(bound)))
        .collect()
}

pub(crate) fn local_addr(fd: &OwnedFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; getsockname fills at most len bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage/len describe a writable buffer.
    cvt(unsafe {
        libc::getsockname(
            fd.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    })?;
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in.
            let sin: libc::sockaddr_in = unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6.
            let s: libc::sockaddr_in6 = unsafe { std::ptr::read((&storage as *const libc::sockaddr_storage).cast()) };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                std::net::Ipv6Addr::from(s.sin6_addr.s6_addr),
                u16::from_be(s.sin6_port),
                s.sin6_flowinfo,
                s.sin6_scope_id,
            )))
        }
        f => Err(io::Error::other(format!("unexpected address family {f}"))),
    }
}

/// Disables Nagle on an accepted connection: frames are already coalesced
/// per loop turn, so delaying them only adds latency.
pub(crate) fn set_nodelay(fd: libc::c_int) {
    let one: libc::c_int = 1;
    // SAFETY: fd is an open TCP socket; failure is harmless (best effort).
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}
