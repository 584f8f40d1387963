//! `cnse-dp bench-idle`: what an idle connection costs the server (issue
//! 13, "Scale"). Opens N connections, completes HELLO on each (so every one
//! is a live, authenticated session, not a half-open socket), holds them,
//! and reads the servers' RSS and descriptor counts before, while held and
//! after they close.
//!
//! One process may hold only as many descriptors as its open-file limit
//! (20,000 on the machines here, hard), so the connections are spread over
//! child processes (`--per-process`), and over several loopback source
//! addresses (`--source-ips 127.0.0.1,127.0.0.2,...`), each of which has
//! about 28,000 ephemeral ports towards one server port. The server side
//! has the same limit per process: 100,000 connections need several server
//! processes on one `SO_REUSEPORT` address, all named by `--server-pid`.
//!
//! Each connection costs the load side one descriptor and a few bytes: no
//! reader thread, no buffers beyond the handshake's stack array.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::FromRawFd;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cnse_proto::{Kind, HEADER_BYTES};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server's binary-protocol address.
    #[arg(long)]
    addr: SocketAddrV4,
    /// Connections to open and hold, all processes together.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Loopback source addresses, used in turn (comma list).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    source_ips: Vec<Ipv4Addr>,
    /// Server process ids whose RSS and descriptors are read (comma list).
    #[arg(long, value_delimiter = ',', required = true)]
    server_pid: Vec<u32>,
    /// Connections per load process (0: the open-file limit less 64).
    #[arg(long, default_value_t = 0)]
    per_process: usize,
    /// Seconds to hold all connections before reading the servers.
    #[arg(long, default_value_t = 3)]
    hold_secs: u64,
    /// Internal: run as one load process holding `--connections`.
    #[arg(long, hide = true)]
    child: bool,
    /// Internal: the first source address index of this child.
    #[arg(long, hide = true, default_value_t = 0)]
    ip_offset: usize,
}

pub fn run(a: Args) -> Result<()> {
    if a.source_ips.is_empty() {
        bail!("--source-ips: give at least one address");
    }
    if a.child {
        return child(&a);
    }
    let per = if a.per_process > 0 {
        a.per_process
    } else {
        let soft = open_file_limit()?;
        soft.saturating_sub(64).max(1)
    };
    let procs = a.connections.div_ceil(per).max(1);
    let before = sample(&a.server_pid)?;
    println!(
        "bench-idle: {} connections to {} from {} source address(es), {} load process(es) of up to {per}",
        a.connections,
        a.addr,
        a.source_ips.len(),
        procs
    );
    let exe = std::env::current_exe().context("locate the cnse-dp binary")?;
    let ips: Vec<String> = a.source_ips.iter().map(|ip| ip.to_string()).collect();
    let started = Instant::now();
    let mut children: Vec<(Child, ChildStdin, BufReader<std::process::ChildStdout>)> = Vec::new();
    let mut left = a.connections;
    for p in 0..procs {
        let n = left.min(per);
        left -= n;
        let mut c = Command::new(&exe)
            .args(["bench-idle", "--child", "--addr", &a.addr.to_string()])
            .args(["--connections", &n.to_string(), "--source-ips", &ips.join(",")])
            .args(["--server-pid", "1", "--ip-offset", &p.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("start a load process")?;
        let stdin = c.stdin.take().context("load process stdin")?;
        let stdout = BufReader::new(c.stdout.take().context("load process stdout")?);
        children.push((c, stdin, stdout));
    }
    // Each child prints "ready N" once all its connections have HELLO_ACK,
    // or one error line and exits.
    let mut opened = 0usize;
    let mut failures = Vec::new();
    for (i, (_, _, out)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line).context("read a load process")?;
        match line.trim().strip_prefix("ready ") {
            Some(n) => opened += n.parse::<usize>().unwrap_or(0),
            None => failures.push(format!("load process {i}: {}", line.trim())),
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(a.hold_secs));
    let held = sample(&a.server_pid)?;
    // Every connection is still served: each child pings all of its own.
    for (c, stdin, _) in children.iter_mut() {
        let _ = writeln!(stdin, "ping");
        let _ = c.id();
    }
    let mut pinged = 0usize;
    for (i, (_, _, out)) in children.iter_mut().enumerate() {
        let mut line = String::new();
        out.read_line(&mut line).context("read a load process")?;
        match line.trim().strip_prefix("pinged ") {
            Some(n) => pinged += n.parse::<usize>().unwrap_or(0),
            None => failures.push(format!("load process {i}: {}", line.trim())),
        }
    }
    for (mut c, stdin, _) in children {
        drop(stdin); // EOF: the child closes its connections and exits
        let _ = c.wait();
    }
    // The server notices the closes on its next turns.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = sample(&a.server_pid)?;
    while after.fds > before.fds + 8 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        after = sample(&a.server_pid)?;
    }

    let rss_per_conn = (held.rss_kib.saturating_sub(before.rss_kib) * 1024) as f64 / opened.max(1) as f64;
    println!(
        "connected      {opened} of {} in {connect_s:.1} s (HELLO_ACK on each)",
        a.connections
    );
    println!("still served   {pinged} answered a PING after {} s held", a.hold_secs);
    println!(
        "server RSS     {} KiB before, {} KiB held, {} KiB after close ({} server process(es))",
        before.rss_kib,
        held.rss_kib,
        after.rss_kib,
        a.server_pid.len()
    );
    println!(
        "server fds     {} before, {} held, {} after close",
        before.fds, held.fds, after.fds
    );
    println!(
        "RSS per connection {rss_per_conn:.0} bytes (growth while held); {:.0} bytes counting the servers' whole RSS",
        (held.rss_kib * 1024) as f64 / opened.max(1) as f64
    );
    println!(
        "csv,idle_connections,{opened},{},{},{},{rss_per_conn:.0}",
        before.rss_kib, held.rss_kib, after.rss_kib
    );
    for f in &failures {
        println!("problem: {f}");
    }
    if opened < a.connections || pinged < opened || !failures.is_empty() {
        bail!(
            "{} of {} connections held and {pinged} answered (see the problems above)",
            opened,
            a.connections
        );
    }
    Ok(())
}

struct Sample {
    rss_kib: u64,
    fds: usize,
}

fn sample(pids: &[u32]) -> Result<Sample> {
    let mut s = Sample { rss_kib: 0, fds: 0 };
    for &pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("read /proc/{pid}/status (is --server-pid {pid} running?)"))?;
        s.rss_kib += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
        s.fds += std::fs::read_dir(format!("/proc/{pid}/fd"))
            .with_context(|| format!("read /proc/{pid}/fd"))?
            .count();
    }
    Ok(s)
}

fn open_file_limit() -> Result<usize> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    // Raise the soft limit to the hard one: this process holds sockets.
    if r.rlim_cur < r.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            r.rlim_cur = r.rlim_max;
        }
    }
    Ok(r.rlim_cur as usize)
}

/// One load process: opens its connections, answers the parent's "ping"
/// line by pinging each, and closes them at EOF on stdin.
fn child(a: &Args) -> Result<()> {
    let limit = open_file_limit()?;
    if a.connections + 16 > limit {
        println!(
            "error: {} connections need more descriptors than the limit {limit}",
            a.connections
        );
        return Ok(());
    }
    let mut conns = Vec::with_capacity(a.connections);
    let mut hello = Vec::with_capacity(HEADER_BYTES);
    cnse_proto::put_hello(&mut hello, b"");
    for i in 0..a.connections {
        let ip = a.source_ips[(a.ip_offset + i) % a.source_ips.len()];
        match open(ip, a.addr, &hello) {
            Ok(s) => conns.push(s),
            Err(e) => {
                println!("error: connection {i} from {ip}: {e:#}");
                return Ok(());
            }
        }
    }
    println!("ready {}", conns.len());
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin.lock().read_line(&mut line)? > 0 {
        if line.trim() == "ping" {
            let mut ping = Vec::with_capacity(HEADER_BYTES);
            cnse_proto::put_ping(&mut ping, 0, 7, 9, b"");
            let mut ok = 0usize;
            for s in conns.iter_mut() {
                if s.write_all(&ping).is_ok() && read_frame_kind(s).is_ok_and(|k| k == Kind::Pong) {
                    ok += 1;
                }
            }
            println!("pinged {ok}");
        }
        line.clear();
    }
    Ok(())
}

/// Connects from `ip` (port chosen by the kernel) and completes HELLO.
fn open(ip: Ipv4Addr, to: SocketAddrV4, hello: &[u8]) -> Result<TcpStream> {
    let from = SocketAddr::V4(SocketAddrV4::new(ip, 0));
    let to = SocketAddr::V4(to);
    let s = bound_socket(from)?;
    let mut s = s;
    connect(&s, to)?;
    s.set_nodelay(true).ok();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(hello).context("send HELLO")?;
    match read_frame_kind(&mut s)? {
        Kind::HelloAck => Ok(s),
        k => bail!("HELLO answered with {k:?}"),
    }
}

fn bound_socket(from: SocketAddr) -> Result<TcpStream> {
    // SAFETY: socket(2) with constant arguments; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket");
    }
    // SAFETY: fd is a fresh socket nobody else owns; TcpStream closes it.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    let SocketAddr::V4(v4) = from else { bail!("IPv4 only") };
    // The port is picked at connect, per destination: a port bound at
    // bind(2) is reserved against every destination, which would cap each
    // source address at one ephemeral range (about 28,000) in all, TIME_WAIT
    // leftovers of earlier runs included.
    let one: libc::c_int = 1;
    // SAFETY: fd is our socket; the value is a c_int of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    let sa = sockaddr(v4);
    // SAFETY: sa is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bind {from}"));
    }
    Ok(s)
}

fn connect(s: &TcpStream, to: SocketAddr) -> Result<()> {
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(v4) = to else { bail!("IPv4 only") };
    let sa = sockaddr(v4);
    // SAFETY: blocking connect on our socket with a valid sockaddr_in.
    let rc = unsafe {
        libc::connect(
            s.as_raw_fd(),
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("connect {to}"));
    }
    Ok(())
}

fn sockaddr(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Reads one frame (header and payload) and returns its kind.
fn read_frame_kind(s: &mut TcpStream) -> Result<Kind> {
    let mut h = [0u8; HEADER_BYTES];
    s.read_exact(&mut h).context("read a frame header")?;
    let view = cnse_proto::Header::from_array(&h);
    let kind = view
        .kind()
        .with_context(|| format!("unknown frame kind {}", view.kind_raw()))?;
    let mut left = view.payload_len() as usize;
    let mut sink = [0u8; 256];
    while left > 0 {
        let n = left.min(sink.len());
        s.read_exact(&mut sink[..n]).context("read a frame payload")?;
        left -= n;
    }
    Ok(kind)
}
