//! The synthetic backend's own tests: text, pacing, pause, cancel, due
//! order and batching.

use super::*;
use cnse_proto::Params;
use std::collections::HashMap;

struct TestIo(Instant);
impl Io for TestIo {
    fn now(&self) -> Instant {
        self.0
    }
    unsafe fn submit(&mut self, _tag: u64, _entry: io_uring::squeue::Entry) {
        unreachable!()
    }
}

#[derive(Default)]
struct Collect {
    text: Vec<u8>,
    tokens: u32,
    ended: Option<FinishReason>,
    pause_at: Option<u32>,
}
impl Sink for Collect {
    fn token(&mut self, _id: WorkId, text: &[u8]) -> Delivery {
        self.text.extend_from_slice(text);
        self.tokens += 1;
        if Some(self.tokens) == self.pause_at {
            Delivery::Pause
        } else {
            Delivery::Accepted
        }
    }
    fn end(&mut self, _id: WorkId, reason: FinishReason) {
        self.ended = Some(reason);
    }
    fn error(&mut self, _id: WorkId, _code: u32, _message: &str) {
        panic!("no errors expected")
    }
}

fn backend(ttft_ms: u64, interval_ms: u64) -> Synthetic {
    let cfg = SyntheticConfig {
        ttft: Duration::from_millis(ttft_ms),
        token_interval: Duration::from_millis(interval_ms),
        ..Default::default()
    };
    Synthetic::new(cfg, Vocab::shared_arc().clone(), Box::new(HashPicker))
}

fn job(now: Instant, max_tokens: u32) -> Job<'static> {
    Job {
        id: WorkId(7),
        params: Params {
            max_tokens,
            seed: 3,
            ..Params::default()
        },
        prompt: "hello",
        arrived: now,
        chat: None,
        session: None,
    }
}

#[test]
fn zero_delay_produces_expected_text() {
    let mut b = backend(0, 0);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    b.start(job(t0, 40), &mut io).unwrap();
    let mut sink = Collect::default();
    assert_eq!(b.poll(&mut io, &mut sink), None);
    assert_eq!(sink.tokens, 40);
    assert_eq!(sink.ended, Some(FinishReason::Length));
    assert_eq!(sink.text, expected_text("hello", 3, 40));
    assert!(std::str::from_utf8(&sink.text).is_ok());
    assert_eq!(b.stats().active, 0);
}

/// Every stream's text in its own buffer.
#[derive(Default)]
struct PerStream {
    text: HashMap<WorkId, Vec<u8>>,
    ended: Vec<WorkId>,
}
impl Sink for PerStream {
    fn token(&mut self, id: WorkId, text: &[u8]) -> Delivery {
        self.text.entry(id).or_default().extend_from_slice(text);
        Delivery::Accepted
    }
    fn end(&mut self, id: WorkId, _reason: FinishReason) {
        self.ended.push(id);
    }
    fn error(&mut self, _id: WorkId, _code: u32, _message: &str) {
        panic!("no errors expected")
    }
}

/// The hash picker takes a turn's tokens in batches of 256: the id and
/// run buffers stay that size however many tokens are due (here
/// 200 streams × 256), every stream still gets at most 256 tokens a
/// poll, and each text is the stream's own.
#[test]
fn a_turn_of_many_streams_is_picked_in_bounded_batches() {
    let mut b = backend(0, 0);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    for i in 0..200u64 {
        let mut j = job(t0, 300);
        j.id = WorkId(i);
        j.params.seed = i;
        b.start(j, &mut io).unwrap();
    }
    let mut sink = PerStream::default();
    assert_eq!(b.poll(&mut io, &mut sink), Some(t0), "the rest is due at once");
    for i in 0..200u64 {
        let want = expected_text("hello", i, 256);
        assert_eq!(sink.text[&WorkId(i)], want, "stream {i}: 256 tokens in the first poll");
    }
    assert!(b.ids.capacity() <= 256, "id buffer grew to {}", b.ids.capacity());
    assert!(b.runs.capacity() <= 256, "run buffer grew to {}", b.runs.capacity());
    assert_eq!(b.poll(&mut io, &mut sink), None);
    assert_eq!(sink.ended.len(), 200);
    for i in 0..200u64 {
        assert_eq!(sink.text[&WorkId(i)], expected_text("hello", i, 300), "stream {i}");
    }
}

#[test]
fn paced_by_ttft_and_interval() {
    let mut b = backend(10, 2);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    b.start(job(t0, 5), &mut io).unwrap();
    let mut sink = Collect::default();
    assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(10)));
    assert_eq!(sink.tokens, 0);
    io.0 = t0 + Duration::from_millis(10);
    assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(12)));
    assert_eq!(sink.tokens, 1);
    // Late loop: catches up with every token due by then.
    io.0 = t0 + Duration::from_millis(16);
    b.poll(&mut io, &mut sink);
    assert_eq!(sink.tokens, 4);
    io.0 = t0 + Duration::from_millis(18);
    assert_eq!(b.poll(&mut io, &mut sink), None);
    assert_eq!(sink.ended, Some(FinishReason::Length));
}

#[test]
fn pause_stops_until_resume() {
    let mut b = backend(0, 0);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    b.start(job(t0, 10), &mut io).unwrap();
    let mut sink = Collect {
        pause_at: Some(3),
        ..Default::default()
    };
    assert_eq!(b.poll(&mut io, &mut sink), None, "paused work is not scheduled");
    assert_eq!(sink.tokens, 3);
    assert_eq!(b.stats().paused, 1);
    b.resume(WorkId(7), &mut io);
    b.poll(&mut io, &mut sink);
    assert_eq!(sink.tokens, 10);
    assert_eq!(sink.text, expected_text("hello", 3, 10));
}

#[test]
fn cancel_frees_work() {
    let mut b = backend(5, 5);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    b.start(job(t0, 10), &mut io).unwrap();
    b.cancel(WorkId(7), &mut io);
    assert_eq!(b.stats().active, 0);
    let mut sink = Collect::default();
    io.0 = t0 + Duration::from_secs(1);
    assert_eq!(b.poll(&mut io, &mut sink), None);
    assert_eq!(sink.tokens, 0);
}

/// Entries out of due order (a late stream catching up, a resume) go
/// to the heap beside the FIFO; tokens still come in due order and the
/// next wake-up is the earlier of the two heads.
#[test]
fn fifo_and_heap_together_keep_due_order() {
    let mut b = backend(5, 10);
    let t0 = Instant::now();
    let mut io = TestIo(t0);
    let mut a = job(t0, 3);
    a.id = WorkId(1);
    b.start(a, &mut io).unwrap(); // due t0+5 (FIFO)
    io.0 = t0 + Duration::from_millis(1);
    let mut c = job(io.0, 3);
    c.id = WorkId(2);
    b.start(c, &mut io).unwrap(); // due t0+6 (FIFO)
    b.pause(WorkId(1));
    io.0 = t0 + Duration::from_millis(2);
    b.resume(WorkId(1), &mut io); // due t0+5 again, before the FIFO's back: heap
    let mut sink = Collect::default();
    assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(5)));
    io.0 = t0 + Duration::from_millis(5);
    assert_eq!(b.poll(&mut io, &mut sink), Some(t0 + Duration::from_millis(6)));
    assert_eq!(sink.tokens, 1, "only the first stream was due");
    io.0 = t0 + Duration::from_millis(100);
    assert_eq!(b.poll(&mut io, &mut sink), None);
    assert_eq!(sink.tokens, 6);
    assert_eq!(b.stats().active, 0);
}
