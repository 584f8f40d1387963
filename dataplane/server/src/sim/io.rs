//! The simulated kernel: sockets, the receive and send ops the session
//! asked for, and a check of every request against what a kernel allows
//! (one receive and one send per socket, nothing on a closed socket, no
//! close while an op is in flight).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::time::Instant;

use cnse_backend::Io;

use crate::transport::{ConnRef, Transport};

/// A socket as the simulated kernel sees it.
#[derive(Debug)]
pub struct Socket {
    /// The client on the other end.
    pub client: usize,
    /// The session shut it (shutdown(2)): pending ops complete.
    pub shut: bool,
    /// The session closed it.
    pub closed: bool,
    pub recv: Option<RecvOp>,
    pub send: Option<SendOp>,
}

#[derive(Debug)]
pub struct RecvOp {
    pub conn: ConnRef,
    pub cancel_requested: bool,
}

#[derive(Debug)]
pub struct SendOp {
    pub conn: ConnRef,
    /// A copy of the bytes handed over (the session keeps its buffer in
    /// place until completion; the copy lets short sends deliver a prefix).
    pub bytes: Vec<u8>,
}

pub struct SimIo {
    pub now: Instant,
    pub sockets: BTreeMap<RawFd, Socket>,
    /// Sockets in `sockets` not yet closed (kept as a count: the fuzzer
    /// checks it after every event, and closed sockets stay listed).
    open: usize,
    pub next_fd: RawFd,
    /// Transport misuse seen so far (each is an invariant failure).
    pub misuse: Vec<String>,
}

impl SimIo {
    pub fn new(now: Instant) -> SimIo {
        SimIo {
            now,
            sockets: BTreeMap::new(),
            open: 0,
            next_fd: 100,
            misuse: Vec::new(),
        }
    }

    /// A new connection from `client`; its fd.
    pub fn connect(&mut self, client: usize) -> RawFd {
        let fd = self.next_fd;
        self.next_fd += 1;
        self.open += 1;
        self.sockets.insert(
            fd,
            Socket {
                client,
                shut: false,
                closed: false,
                recv: None,
                send: None,
            },
        );
        fd
    }

    fn live(&mut self, fd: RawFd, what: &str) -> Option<&mut Socket> {
        match self.sockets.get_mut(&fd) {
            Some(s) if !s.closed => Some(s),
            Some(_) => {
                self.misuse.push(format!("{what} on closed fd {fd}"));
                None
            }
            None => {
                self.misuse.push(format!("{what} on unknown fd {fd}"));
                None
            }
        }
    }

    /// Sockets the session has not closed.
    pub fn open_sockets(&self) -> usize {
        self.open
    }
}

impl Io for SimIo {
    fn now(&self) -> Instant {
        self.now
    }

    unsafe fn submit(&mut self, _tag: u64, _entry: cnse_ring::squeue::Entry) {
        self.misuse.push("the simulated backend submitted a ring op".into());
    }
}

impl Transport for SimIo {
    fn recv(&mut self, conn: ConnRef) {
        if let Some(s) = self.live(conn.fd, "recv") {
            if s.recv.is_some() {
                self.misuse.push(format!("second recv on fd {}", conn.fd));
                return;
            }
            s.recv = Some(RecvOp {
                conn,
                cancel_requested: false,
            });
        }
    }

    fn cancel_recv(&mut self, conn: ConnRef) {
        if let Some(s) = self.live(conn.fd, "cancel_recv") {
            match &mut s.recv {
                Some(r) if r.conn == conn => r.cancel_requested = true,
                _ => self
                    .misuse
                    .push(format!("cancel of a recv that is not in flight on fd {}", conn.fd)),
            }
        }
    }

    unsafe fn send(&mut self, conn: ConnRef, data: &[u8]) {
        if data.is_empty() {
            self.misuse.push(format!("empty send on fd {}", conn.fd));
        }
        if let Some(s) = self.live(conn.fd, "send") {
            if s.send.is_some() {
                self.misuse.push(format!("second send on fd {}", conn.fd));
                return;
            }
            s.send = Some(SendOp {
                conn,
                bytes: data.to_vec(),
            });
        }
    }

    fn shutdown(&mut self, fd: RawFd) {
        if let Some(s) = self.live(fd, "shutdown") {
            s.shut = true;
        }
    }

    fn close(&mut self, fd: RawFd) {
        let busy = match self.live(fd, "close") {
            Some(s) => {
                s.closed = true;
                let busy = s.recv.is_some() || s.send.is_some();
                self.open -= 1;
                busy
            }
            None => false,
        };
        if busy {
            self.misuse.push(format!("close of fd {fd} with an op in flight"));
        }
    }
}
