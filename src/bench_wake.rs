//! `cnse-dp bench-wake`: how fast one core can wake another core's ring, the
//! hand-off a stolen task's results need (issue 10: "IORING_OP_MSG_RING or
//! an eventfd: measure which"). Two threads, each with its own `cnse_ring`
//! ring, pass a token back and forth; each round trip is two wakes.
//!
//! - `msg-ring`: the sender pushes IORING_OP_MSG_RING onto its own ring; the
//!   kernel posts a completion straight into the peer's ring.
//! - `eventfd`: each ring keeps a read of its eventfd armed; the sender
//!   writes the peer's eventfd with a plain `write(2)` (what a thread
//!   without a ring, such as the MPI communication thread, can do).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cnse_metrics::LatencyHistogram;
use cnse_ring::{opcode, types, Completion, Ring, RingConfig, Tag};

cnse_ring::op_kinds! {
    /// The bench's ops.
    enum Op { Wake = 1, Sent = 2, Read = 3 }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mechanism {
    MsgRing,
    Eventfd,
    Both,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Round trips measured (after the warm-up).
    #[arg(long, default_value_t = 20_000)]
    rounds: u32,
    #[arg(long, default_value_t = 2_000)]
    warmup: u32,
    #[arg(long, value_enum, default_value_t = Mechanism::Both)]
    mechanism: Mechanism,
    /// Pin the two threads to the first two allowed CPUs (two cores, as
    /// two server workers would be).
    #[arg(long)]
    pin: bool,
}

pub fn run(a: Args) -> Result<()> {
    anyhow::ensure!(
        a.rounds >= 1 && a.rounds <= 10_000_000,
        "--rounds must be in 1..=10000000"
    );
    let mechs: &[Mechanism] = match a.mechanism {
        Mechanism::Both => &[Mechanism::MsgRing, Mechanism::Eventfd],
        Mechanism::MsgRing => &[Mechanism::MsgRing],
        Mechanism::Eventfd => &[Mechanism::Eventfd],
    };
    println!(
        "{:<10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "mechanism", "rounds", "p50 µs", "p90 µs", "p99 µs", "max µs"
    );
    // Read before the first pin narrows this thread's own affinity.
    let cpus = if a.pin {
        let c = cnse_ring::allowed_cpus().context("allowed CPUs")?;
        anyhow::ensure!(c.len() >= 2, "--pin needs two CPUs, {} allowed", c.len());
        Some((c[0], c[1]))
    } else {
        None
    };
    for &m in mechs {
        let h = ping_pong(m, a.warmup, a.rounds, cpus)?;
        println!(
            "{:<10}{:>10}{:>10.1}{:>10.1}{:>10.1}{:>10}",
            if m == Mechanism::MsgRing { "msg-ring" } else { "eventfd" },
            h.count(),
            h.quantile_us(0.5) as f64,
            h.quantile_us(0.9) as f64,
            h.quantile_us(0.99) as f64,
            h.max_us()
        );
    }
    println!("(round trip = two wakes; latency in µs, whole microseconds)");
    Ok(())
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative return is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd");
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One side's ring and how it wakes the peer.
struct Side {
    ring: Ring,
    mech: Mechanism,
    my_efd: RawFd,
    peer_efd: RawFd,
    peer_ring: RawFd,
    /// The armed eventfd read's target; boxed so it stays put for the kernel.
    read_buf: Box<[u8; 8]>,
    out: Vec<Completion>,
}

impl Side {
    fn arm_read(&mut self) -> Result<()> {
        let e = opcode::Read::new(types::Fd(self.my_efd), self.read_buf.as_mut_ptr(), 8).build();
        // SAFETY: `read_buf` lives in this Side, which outlives the ring's
        // use (the ring is torn down before the Side drops), and nothing
        // else touches it while the read is armed.
        unsafe { self.ring.push(e, Tag::wide(Op::Read.code(), 0)) }.context("push read")
    }

    fn wake_peer(&mut self, seq: u64) -> Result<()> {
        match self.mech {
            Mechanism::MsgRing => {
                let e = opcode::MsgRingData::new(
                    types::Fd(self.peer_ring),
                    0,
                    Tag::wide(Op::Wake.code(), seq).raw(),
                    None,
                )
                .build();
                // SAFETY: MSG_RING points at no buffer, only the peer's ring
                // descriptor, which stays open until both threads are joined.
                unsafe { self.ring.push(e, Tag::wide(Op::Sent.code(), seq)) }.context("push msg_ring")?;
                // Submit now (a zero-timeout turn), so the wake leaves at once.
                let mut extra = Vec::new();
                self.ring.turn(Some(std::time::Duration::ZERO), &mut extra)?;
                self.out.extend(extra);
                Ok(())
            }
            _ => {
                let one = 1u64.to_ne_bytes();
                // SAFETY: writes 8 bytes from a live local buffer to an
                // eventfd that stays open until both threads are joined.
                let n = unsafe { libc::write(self.peer_efd, one.as_ptr().cast(), 8) };
                if n != 8 {
                    return Err(std::io::Error::last_os_error()).context("write eventfd");
                }
                Ok(())
            }
        }
    }

    /// Waits for the peer's wake; handles this ring's other completions.
    fn wait_wake(&mut self) -> Result<()> {
        loop {
            for c in std::mem::take(&mut self.out) {
                match Op::from_code(c.tag.kind()) {
                    Some(Op::Wake) => return Ok(()),
                    Some(Op::Read) => {
                        c.check("eventfd read")?;
                        self.arm_read()?;
                        return Ok(());
                    }
                    Some(Op::Sent) => {
                        c.check("msg_ring")?;
                    }
                    None => bail!("unexpected completion kind {}", c.tag.kind()),
                }
            }
            let mut got = Vec::new();
            self.ring.turn(None, &mut got)?;
            self.out = got;
        }
    }
}

fn side(
    mech: Mechanism,
    my_efd: RawFd,
    peer_efd: RawFd,
    tx: mpsc::Sender<RawFd>,
    rx: mpsc::Receiver<RawFd>,
) -> Result<Side> {
    let ring = Ring::new(RingConfig::default()).context("ring")?;
    tx.send(ring.raw().as_raw_fd()).ok();
    let peer_ring = rx.recv().context("peer ring fd")?;
    let mut s = Side {
        ring,
        mech,
        my_efd,
        peer_efd,
        peer_ring,
        read_buf: Box::new([0; 8]),
        out: Vec::new(),
    };
    if mech == Mechanism::Eventfd {
        s.arm_read()?;
    }
    Ok(s)
}

fn ping_pong(mech: Mechanism, warmup: u32, rounds: u32, cpus: Option<(usize, usize)>) -> Result<LatencyHistogram> {
    let (efd_a, efd_b) = (eventfd()?, eventfd()?);
    let (a_fd, b_fd) = (efd_a.as_raw_fd(), efd_b.as_raw_fd());
    let (tx_a, rx_b) = mpsc::channel();
    let (tx_b, rx_a) = mpsc::channel();
    let total = warmup + rounds;
    let echo = std::thread::spawn(move || -> Result<()> {
        if let Some((_, cpu)) = cpus {
            cnse_ring::pin_current_thread_to(cpu).context("pin")?;
        }
        let mut s = side(mech, b_fd, a_fd, tx_b, rx_b)?;
        for i in 0..total {
            s.wait_wake()?;
            s.wake_peer(i as u64)?;
        }
        // The last MSG_RING's own completion, so nothing is in flight.
        let mut rest = Vec::new();
        s.ring.teardown(std::time::Duration::from_secs(1), &mut rest)?;
        Ok(())
    });
    if let Some((cpu, _)) = cpus {
        cnse_ring::pin_current_thread_to(cpu).context("pin")?;
    }
    let mut s = side(mech, a_fd, b_fd, tx_a, rx_a)?;
    let mut h = LatencyHistogram::new();
    for i in 0..total {
        let t = Instant::now();
        s.wake_peer(i as u64)?;
        s.wait_wake()?;
        if i >= warmup {
            h.record(t.elapsed());
        }
    }
    let mut rest = Vec::new();
    s.ring.teardown(std::time::Duration::from_secs(1), &mut rest)?;
    match echo.join() {
        Ok(r) => r?,
        Err(_) => bail!("the echo thread panicked"),
    }
    drop((efd_a, efd_b));
    Ok(h)
}
