//! Peer server on tokio (epoll): the protocol subset of `peer/session.rs`
//! (HELLO, PING, REQUEST with cnse-dp's zero-delay synthetic text within
//! credit) as a tokio user would write it for throughput: thread per core,
//! each thread a current-thread runtime with its own SO_REUSEPORT listener
//! (no work stealing, no cross-thread wake-ups), one task per connection
//! that reads up to 64 KiB, answers every whole frame into one buffer and
//! writes it with one `write_all` (buffered writes: one syscall per read,
//! not per frame), TCP_NODELAY.
//!
//! ```sh
//! cargo bench --bench tokio_peer -- --listen 127.0.0.1:7910 [--threads N] [--cpus 0,1]
//! cnse-dp bench --addr 127.0.0.1:7910 --server-pid PID ...
//! ```

#[path = "peer/session.rs"]
mod session;

use std::os::fd::AsRawFd;
use std::time::Instant;

use session::{PeerArgs, Session, Verdict, READ_BUFFER_BYTES};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(mut sock: tokio::net::TcpStream) {
    session::nodelay(sock.as_raw_fd());
    let mut session = Session::new("tokio peer");
    let mut rbuf = vec![0u8; READ_BUFFER_BYTES];
    let mut out = Vec::with_capacity(READ_BUFFER_BYTES);
    loop {
        let n = match sock.read(&mut rbuf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let verdict = session.on_input(&rbuf[..n], Instant::now(), &mut out);
        if !out.is_empty() {
            if sock.write_all(&out).await.is_err() {
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
    if let Some(args) = PeerArgs::parse("tokio_peer") {
        session::thread_per_core(&args, run);
    }
}

/// One thread's runtime and accept loop.
fn run(listener: std::net::TcpListener) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        listener.set_nonblocking(true).expect("non-blocking listener");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        loop {
            if let Ok((sock, _)) = listener.accept().await {
                tokio::task::spawn(serve(sock));
            }
        }
    });
}
