//! Peer server on tokio-uring (io_uring under a tokio current-thread
//! runtime): the protocol subset of `peer/session.rs` (HELLO, PING,
//! REQUEST with cnse-dp's zero-delay synthetic text within credit), as the
//! crate's own echo examples are written, scaled the thread-per-core way:
//! one `tokio_uring::start` per thread, each with its own SO_REUSEPORT
//! listener, one task per connection with owned buffers (read into a
//! 64 KiB buffer handed to the kernel, every whole frame answered into one
//! buffer, one `write_all` per read), TCP_NODELAY.
//!
//! ```sh
//! cargo bench --bench tokio_uring_peer -- --listen 127.0.0.1:7920 [--threads N] [--cpus 0,1]
//! ```

#[path = "peer/session.rs"]
mod session;

use std::os::fd::AsRawFd;
use std::time::Instant;

use session::{PeerArgs, Session, Verdict, READ_BUFFER_BYTES};

async fn serve(sock: tokio_uring::net::TcpStream) {
    session::nodelay(sock.as_raw_fd());
    let mut session = Session::new("tokio-uring peer");
    let mut rbuf = vec![0u8; READ_BUFFER_BYTES];
    let mut out = Vec::with_capacity(READ_BUFFER_BYTES);
    loop {
        let (res, buf) = sock.read(rbuf).await;
        rbuf = buf;
        let n = match res {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let verdict = session.on_input(&rbuf[..n], Instant::now(), &mut out);
        if !out.is_empty() {
            let (res, buf) = sock.write_all(out).await;
            out = buf;
            if res.is_err() {
                return;
            }
            out.clear();
        }
        if verdict == Verdict::Close {
            return;
        }
    }
}

fn main() {
    if let Some(args) = PeerArgs::parse("tokio_uring_peer") {
        session::thread_per_core(&args, run);
    }
}

/// One thread's runtime and accept loop.
fn run(listener: std::net::TcpListener) {
    tokio_uring::start(async move {
        let listener = tokio_uring::net::TcpListener::from_std(listener);
        loop {
            if let Ok((sock, _)) = listener.accept().await {
                tokio_uring::spawn(serve(sock));
            }
        }
    });
}
