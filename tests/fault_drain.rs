//! Issue 11, fault and bad-input suite: SIGTERM while streams are in
//! flight. Running streams drain to their END with every token of a clean
//! run; new REQUESTs on open connections get ERROR 503 on their stream;
//! queued requests get 503 at once; connections opened during the drain
//! are closed without a frame (the server stopped accepting); then the
//! server exits 0. Against the real binary on loopback.

mod common;

use std::time::{Duration, Instant};

use cnse_proto::code;
use common::*;

const CLIENTS: u64 = 10;
const STREAMS: u64 = 4;
const TOKENS: u32 = 200;

fn p(client: u64, id: u64) -> Params {
    Params {
        max_tokens: TOKENS,
        seed: client * 100 + id,
        ..Params::default()
    }
}

fn prompt(client: u64, id: u64) -> String {
    format!("drain client {client} stream {id}")
}

fn sigterm(s: &Server) {
    // SAFETY: signals the child process this test started, by its pid (> 0).
    let r = unsafe { libc::kill(s.pid() as i32, libc::SIGTERM) };
    assert_eq!(r, 0, "kill(SIGTERM)");
}

/// How a stream ended: (kind, arg, aux) of its END or ERROR.
type End = (Kind, u32, u64);

/// Reads a client's frames until each of its streams `1..=STREAMS` has
/// ended and stream `refused` got its ERROR; returns each stream's text and
/// (kind, arg, aux) of its end.
/// `first` is the frame the client read before (its stream's first);
/// `window`: the client grants back the credit of every TOKENS it reads.
fn drain_client(c: &mut Client, first: &OwnedFrame, window: bool, refused: u64) -> (Vec<Vec<u8>>, Vec<End>) {
    let mut text = vec![Vec::new(); STREAMS as usize];
    let mut tokens = vec![0u64; STREAMS as usize];
    assert_eq!((first.kind, first.aux), (Kind::Tokens, 0), "{first:?}");
    text[first.stream_id as usize - 1] = first.payload.clone();
    tokens[first.stream_id as usize - 1] = u64::from(first.arg);
    if window {
        c.credit(first.stream_id, first.arg).unwrap();
    }
    let mut ends = vec![None; STREAMS as usize];
    let mut refusal = None;
    let mut closed = false;
    while ends.iter().any(Option::is_none) || refusal.is_none() {
        let f = c.next_frame_within(Duration::from_secs(20)).expect("a frame");
        if f.stream_id == refused {
            assert!(refusal.is_none(), "a second frame for the refused stream: {f:?}");
            refusal = Some((f.kind, f.arg));
            continue;
        }
        let i = f.stream_id.wrapping_sub(1) as usize;
        assert!(
            i < STREAMS as usize && ends[i].is_none(),
            "a frame of no open stream: {f:?}"
        );
        match f.kind {
            Kind::Tokens => {
                assert_eq!(f.aux, tokens[i], "stream {}: out of order", f.stream_id);
                tokens[i] += u64::from(f.arg);
                text[i].extend_from_slice(&f.payload);
                // Once its last stream has ended the draining server closes
                // the connection, possibly before this client has read
                // (and credited) the frames already on their way: a
                // refused CREDIT then is no fault. A frame the server
                // never sent is still caught by the read above.
                if window && !closed {
                    closed = c.credit(f.stream_id, f.arg).is_err();
                }
            }
            Kind::End | Kind::Error => ends[i] = Some((f.kind, f.arg, f.aux)),
            _ => panic!("{f:?}"),
        }
    }
    assert_eq!(
        refusal,
        Some((Kind::Error, code::SHUTTING_DOWN)),
        "a REQUEST during the drain"
    );
    (text, ends.into_iter().map(Option::unwrap).collect())
}

#[test]
fn issue11_sigterm_drains_in_flight_streams_to_end_and_answers_new_requests_503() {
    let mut args = vec!["--shutdown-grace-ms", "20000"];
    let pace = synthetic(1_000, 2_000);
    args.extend(strs(&pace));
    let mut s = Server::start(&args);
    // The clean run: every stream to its END, the clients side by side.
    let reference: Vec<Vec<Vec<u8>>> = (0..CLIENTS)
        .map(|c| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut cl = Client::connect_hello(addr, b"", WAIT).unwrap().0;
                (1..=STREAMS)
                    .map(|id| cl.generate(id, 0, &p(c, id), &prompt(c, id), |_, _| {}).unwrap().text)
                    .collect::<Vec<_>>()
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().expect("a clean-run client failed"))
        .collect();

    // 40 streams in flight (200 tokens at 2 ms: 0.4 s each), half
    // of the clients with a credit window of 8.
    let mut clients: Vec<Client> = (0..CLIENTS)
        .map(|c| {
            let mut cl = s.client();
            for id in 1..=STREAMS {
                cl.request(id, if c % 2 == 1 { 8 } else { 0 }, &p(c, id), &prompt(c, id))
                    .unwrap();
            }
            cl
        })
        .collect();
    let mut probe = s.client();
    // Each client's first frame (a token: they are running), then SIGTERM.
    let mut firsts = Vec::new();
    for cl in &mut clients {
        let f = cl.next_frame().unwrap();
        assert_eq!(f.kind, Kind::Tokens, "{f:?}");
        firsts.push(f);
    }
    sigterm(&s);
    let t = Instant::now();
    // The drain has begun once the server itself says so: a probe's short
    // REQUESTs run to END until one gets 503.
    let mut id = 1u64;
    loop {
        probe.request(id, 0, &params(1), "probe").unwrap();
        let f = probe.next_frame_within(Duration::from_secs(20)).unwrap();
        match (f.kind, f.stream_id) {
            (Kind::Tokens, _) => assert_eq!(probe.next_frame().unwrap().kind, Kind::End),
            (Kind::Error, _) if f.arg == code::SHUTTING_DOWN => break,
            _ => panic!("probe: {f:?}"),
        }
        id += 1;
    }
    // Then a new REQUEST on every open connection, and a new connection.
    for (c, cl) in clients.iter_mut().enumerate() {
        cl.request(99, 0, &p(c as u64, 99), "too late").unwrap();
    }
    let mut late = Client::connect(s.addr, WAIT).expect("the listener still takes a TCP connection");
    let mut hello = Vec::new();
    cnse_proto::put_hello(&mut hello, b"");
    // The write may fail when the server closed the connection already.
    let _ = late.write_raw(&hello);

    for (c, cl) in clients.iter_mut().enumerate() {
        let (text, ends) = drain_client(cl, &firsts[c], c % 2 == 1, 99);
        for id in 1..=STREAMS as usize {
            let end = ends[id - 1];
            assert_eq!(
                end,
                (Kind::End, 0, u64::from(TOKENS)),
                "client {c} stream {id}: in flight at SIGTERM, it must finish"
            );
            assert!(
                text[id - 1] == reference[c][id - 1],
                "client {c} stream {id}: tokens differ from the clean run"
            );
        }
    }
    let drained = t.elapsed();
    drop(clients);
    drop(probe);
    let frames = late.read_until_closed(Duration::from_secs(20));
    let frames = frames.expect("the connection opened during the drain is closed");
    assert!(frames.is_empty(), "a connection opened during the drain got {frames:?}");
    let status = s
        .wait_exit(Duration::from_secs(20))
        .expect("the server exits after the drain");
    assert!(status.success(), "exit status {status}");
    eprintln!(
        "{} streams drained to END in {drained:?} after SIGTERM; {CLIENTS} late REQUESTs got 503; server exited {status}",
        CLIENTS * STREAMS
    );
}

#[test]
fn issue11_sigterm_answers_queued_requests_503_at_once_and_running_ones_finish() {
    // Two backend slots: two streams run, the rest wait as tasks.
    let mut args = vec!["--shutdown-grace-ms", "20000", "--synthetic-slots", "2"];
    let pace = synthetic(1_000, 5_000);
    args.extend(strs(&pace));
    let mut s = Server::start(&args);
    let mut c = s.client();
    for id in 1..=6u64 {
        c.request(id, 0, &p(0, id), &prompt(0, id)).unwrap();
    }
    let mut running = std::collections::BTreeSet::new();
    while running.len() < 2 {
        let f = c.next_frame().unwrap();
        assert_eq!(f.kind, Kind::Tokens, "{f:?}");
        running.insert(f.stream_id);
    }
    sigterm(&s);
    let mut ends = std::collections::BTreeMap::new();
    while ends.len() < 6 {
        let f = c.next_frame_within(Duration::from_secs(20)).unwrap();
        match f.kind {
            Kind::Tokens => assert!(running.contains(&f.stream_id), "a queued stream ran: {f:?}"),
            Kind::End | Kind::Error => assert!(ends.insert(f.stream_id, (f.kind, f.arg, f.aux)).is_none()),
            _ => panic!("{f:?}"),
        }
    }
    for (id, end) in &ends {
        if running.contains(id) {
            assert_eq!(*end, (Kind::End, 0, u64::from(TOKENS)), "running stream {id}");
        } else {
            assert_eq!(*end, (Kind::Error, code::SHUTTING_DOWN, 0), "queued stream {id}");
        }
    }
    drop(c);
    let status = s.wait_exit(Duration::from_secs(20)).expect("the server exits");
    assert!(status.success(), "exit status {status}");
}
