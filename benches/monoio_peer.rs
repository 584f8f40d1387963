//! Peer server on monoio (thread-per-core io_uring runtime): the protocol
//! subset of `peer/session.rs` (HELLO, PING, REQUEST with cnse-dp's
//! zero-delay synthetic text within credit), the way monoio's own
//! benchmarks serve: one runtime per core on the io_uring driver, each
//! with its own SO_REUSEPORT listener, one task per connection with owned
//! buffers (read into a 64 KiB buffer, every whole frame answered into
//! one buffer, one `write_all` per read), TCP_NODELAY.
//!
//! ```sh
//! cargo bench --bench monoio_peer -- --listen 127.0.0.1:7930 [--threads N] [--cpus 0,1]
//! ```

#[path = "peer/session.rs"]
mod session;

use std::os::fd::AsRawFd;
use std::time::Instant;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use session::{PeerArgs, Session, Verdict, READ_BUFFER_BYTES};

/// Submission queue entries per runtime (monoio's default is 1024).
const RING_ENTRIES: u32 = 4096;

async fn serve(mut sock: monoio::net::TcpStream) {
    session::nodelay(sock.as_raw_fd());
    let mut session = Session::new("monoio peer");
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
    if let Some(args) = PeerArgs::parse("monoio_peer") {
        session::thread_per_core(&args, run);
    }
}

/// One thread's runtime and accept loop.
fn run(listener: std::net::TcpListener) {
    let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(RING_ENTRIES)
        .build()
        .expect("monoio io_uring runtime");
    rt.block_on(async move {
        let listener = monoio::net::TcpListener::from_std(listener).expect("monoio listener");
        loop {
            if let Ok((sock, _)) = listener.accept().await {
                monoio::spawn(serve(sock));
            }
        }
    });
}
