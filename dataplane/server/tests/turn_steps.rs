//! A loop turn that brings thousands of zero-delay requests is served in
//! steps: once 256 requests have started, the backend runs and their
//! frames are written before the next connection's input, so the turn
//! never holds all of its requests' work at once; every request is still
//! answered in full within the turn.

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cnse_backend::synthetic::{expected_text, SyntheticConfig, SyntheticFactory};
use cnse_backend::{Backend, BackendFactory, BackendStats, Io, Job, Params, Reject, Sink, WorkId};
use cnse_proto::{put_hello, put_request, Direction, FrameDecoder, Kind, PAYLOAD_BYTES_MAX_DEFAULT};
use cnse_server::session::Session;
use cnse_server::transport::NoteIo;
use cnse_server::Config;

/// The synthetic backend, noting the most work it held at once.
struct Peak {
    inner: Box<dyn Backend>,
    peak: Rc<Cell<u64>>,
}

impl Backend for Peak {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn start(&mut self, job: Job<'_>, io: &mut dyn Io) -> Result<(), Reject> {
        self.inner.start(job, io)?;
        self.peak.set(self.peak.get().max(self.inner.active()));
        Ok(())
    }

    fn cancel(&mut self, id: WorkId, io: &mut dyn Io) {
        self.inner.cancel(id, io);
    }

    fn pause(&mut self, id: WorkId) {
        self.inner.pause(id);
    }

    fn resume(&mut self, id: WorkId, io: &mut dyn Io) {
        self.inner.resume(id, io);
    }

    fn complete(&mut self, tag: u64, result: i32, flags: u32, io: &mut dyn Io, sink: &mut dyn Sink) {
        self.inner.complete(tag, result, flags, io, sink);
    }

    fn poll(&mut self, io: &mut dyn Io, sink: &mut dyn Sink) -> Option<Instant> {
        self.inner.poll(io, sink)
    }

    fn stats(&self) -> BackendStats {
        self.inner.stats()
    }
}

const PROMPT: &str = "Write a haiku about the sea.";

#[test]
fn a_turn_of_many_requests_is_served_in_steps_and_in_full() {
    let (conns, inflight) = (32usize, 64u64);
    let now = Instant::now();
    let inner = SyntheticFactory::new(SyntheticConfig {
        ttft: Duration::ZERO,
        token_interval: Duration::ZERO,
        ..SyntheticConfig::default()
    })
    .build(0)
    .unwrap();
    let peak = Rc::new(Cell::new(0));
    let backend = Box::new(Peak {
        inner,
        peak: peak.clone(),
    });
    let io = NoteIo::new(now, true);
    let mut session = Session::new(Arc::new(Config::default()), backend, io, now, 64, 0);
    let mut hello = Vec::new();
    put_hello(&mut hello, b"");
    session.begin_turn(now);
    let slots: Vec<u32> = (0..conns)
        .map(|i| {
            let slot = session.on_accept(100 + i as RawFd).unwrap();
            session.on_input(slot, 0, &hello);
            slot
        })
        .collect();
    session.end_turn();
    // HELLO_ACKs out and done.
    for sent in std::mem::take(&mut session.io_mut().sends) {
        session.on_send_done(sent.conn.slot, sent.conn.gen, sent.len as i32);
    }

    let params = Params {
        max_tokens: 16,
        ..Params::default()
    };
    let mut requests = Vec::new();
    for id in 1..=inflight {
        let p = Params { seed: id, ..params };
        put_request(&mut requests, id, 0, &p, PROMPT.as_bytes());
    }
    let now = now + Duration::from_millis(1);
    session.io_mut().now = now;
    session.begin_turn(now);
    for &slot in &slots {
        session.on_input(slot, 0, &requests);
    }
    let before_end = session.io_mut().sends.len();
    session.end_turn();

    let total = conns as u64 * inflight;
    assert!(before_end > 0, "answers went out before the turn's end");
    assert!(
        peak.get() <= 256 + inflight,
        "at most a step's requests (and one connection's more) held at once: {}",
        peak.get()
    );
    let n = session.counters();
    assert_eq!((n.requests, n.tokens_sent, n.streams_open), (total, 16 * total, 0));
    // Every connection: one send with each of its streams' 16 tokens, the
    // text its seed gives, and END.
    let sends = std::mem::take(&mut session.io_mut().sends);
    assert_eq!(sends.len(), conns, "one send per connection");
    for sent in &sends {
        let mut text = vec![Vec::new(); inflight as usize + 1];
        let mut ends = 0;
        let mut d = FrameDecoder::new(Direction::ToClient, PAYLOAD_BYTES_MAX_DEFAULT);
        let mut input = &sent.bytes[..];
        while let Some(f) = d.next(&mut input).unwrap() {
            let id = f.header.stream_id() as usize;
            match f.kind {
                Kind::Tokens => text[id].extend_from_slice(f.payload),
                Kind::End => ends += 1,
                k => panic!("unexpected {k:?}"),
            }
        }
        assert_eq!(ends, inflight);
        for id in 1..=inflight {
            assert_eq!(text[id as usize], expected_text(PROMPT, id, 16), "stream {id}");
        }
    }
}
