//! Work stealing inside one server process (issue 10): requests beyond a
//! core's backend slots become tasks that idle cores steal; the tokens go
//! back to the core that owns the client. The servers here accept on one
//! worker only (`--accept-threads 1`) and have one synthetic slot per
//! worker, so a second concurrent request can only run on the other core.

mod common;

use std::time::Duration;

use common::*;

/// Two workers, only worker 0 accepting, one backend slot each.
fn stealing_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--threads",
        "2",
        "--accept-threads",
        "1",
        "--synthetic-slots",
        "2",
        "--stats-interval-ms",
        "50",
    ];
    args.extend(extra);
    Server::start(&args)
}

fn params_seeded(max_tokens: u32, seed: u64) -> Params {
    Params {
        max_tokens,
        seed,
        ..Params::default()
    }
}

/// Generates `prompt` on a fresh connection and returns its text.
fn text_of(s: &Server, prompt: &str, p: &Params) -> (Vec<u8>, u64) {
    let mut c = s.client();
    let g = c.generate(1, 0, p, prompt, |_, _| {}).expect("generation");
    (g.text, g.tokens)
}

#[test]
fn issue10_stolen_streams_carry_exactly_the_tokens_of_a_local_run() {
    let synth = synthetic(2_000, 500);
    let local = Server::start(&strs(&synth));
    let stealing = stealing_server(&strs(&synth));
    let jobs: Vec<(String, Params)> = (0..24)
        .map(|i| {
            (
                format!("prompt number {i} about work stealing"),
                params_seeded(24 + i, 1000 + u64::from(i)),
            )
        })
        .collect();
    let want: Vec<(Vec<u8>, u64)> = jobs.iter().map(|(p, q)| text_of(&local, p, q)).collect();
    // Four clients at once on worker 0: more than its one slot.
    let got: Vec<(Vec<u8>, u64)> = std::thread::scope(|sc| {
        let handles: Vec<_> = jobs
            .chunks(6)
            .map(|chunk| {
                let s = &stealing;
                sc.spawn(move || chunk.iter().map(|(p, q)| text_of(s, p, q)).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w.1, u64::from(24 + i as u32), "request {i}: max_tokens tokens");
        assert_eq!(
            w, g,
            "request {i}: the stolen or local run differs from the one-core run"
        );
    }
    assert!(
        eventually(WAIT, || stealing.stat("stolen").is_some_and(|n| n > 0)),
        "worker 1 never stole: {:?}",
        stealing.output()
    );
    let steals = stealing
        .output()
        .into_iter()
        .rev()
        .find(|l| l.starts_with("steals "))
        .unwrap();
    assert!(steals.contains(" w1=0/"), "worker 1 accepts nothing: {steals}");
}

/// Starts a long stream on worker 0's slot and a second one that only
/// worker 1 can run; returns once both run.
fn two_running(s: &Server, c: &mut Client, second_credit: u32) {
    let slow = params(4_000);
    c.request(1, 0, &slow, "the first stream holds worker 0's slot")
        .unwrap();
    c.request(2, second_credit, &params(200), "the second stream runs on worker 1")
        .unwrap();
    assert!(
        eventually(WAIT, || s.stat("active") == Some(2) && s.stat("stolen") == Some(1)),
        "both streams running, one stolen: {:?}",
        s.output()
    );
}

#[test]
fn issue10_cancel_and_disconnect_reach_a_stolen_stream() {
    let synth = synthetic(1_000, 20_000);
    let s = stealing_server(&strs(&synth));
    let mut c = s.client();
    two_running(&s, &mut c, 0);
    c.cancel(2).unwrap();
    let frames = loop {
        let f = c.next_frame().unwrap();
        if f.stream_id == 2 && f.kind == Kind::End {
            break f;
        }
    };
    assert_eq!(frames.arg, FinishReason::Cancelled as u32, "END reason cancelled");
    assert!(
        eventually(WAIT, || s.stat("active") == Some(1)),
        "the cancel freed worker 1's slot: {:?}",
        s.output()
    );
    // A third stream takes worker 1's freed slot; then the client goes away.
    c.request(3, 0, &params(4_000), "a third stream").unwrap();
    assert!(eventually(WAIT, || s.stat("active") == Some(2) && s.stat("stolen") == Some(2)));
    drop(c);
    assert!(
        eventually(WAIT, || s.stat("active") == Some(0) && s.stat("streams") == Some(0)),
        "a disconnect frees the work on both cores: {:?}",
        s.output()
    );
}

#[test]
fn issue10_a_stolen_stream_pauses_without_credit_and_resumes() {
    let synth = synthetic(0, 0);
    let mut extra = strs(&synth);
    extra.extend(["--stream-buffered-tokens-max", "8"]);
    let s = stealing_server(&extra);
    let mut c = s.client();
    // Stream 2 runs on worker 1 with 3 tokens of credit: its runner must
    // stop at the owner's bound (8 queued) and wait.
    // Stream 1 (one token of credit) pauses holding worker 0's slot.
    c.request(1, 1, &params(4_000), "the first stream holds worker 0's slot")
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.request(2, 3, &params(200), "the second stream runs on worker 1")
        .unwrap();
    assert!(
        eventually(WAIT, || s.stat("paused") == Some(2) && s.stat("stolen") == Some(1)),
        "the stolen work pauses: {:?}",
        s.output()
    );
    // Stream 1 made 1 + 8 tokens, stream 2 at most 3 + 8: bounded.
    std::thread::sleep(Duration::from_millis(200));
    let produced = s.stat("produced").unwrap();
    assert!(produced <= 9 + 11, "{produced} tokens made while no credit came");
    c.cancel(1).unwrap();
    // Only stream 2 now: its production stayed within credit + the bound.
    let mut tokens2 = 0u64;
    let mut text = Vec::new();
    let mut granted = 3u64;
    loop {
        let f = c.next_frame().unwrap();
        if f.stream_id != 2 {
            continue;
        }
        match f.kind {
            Kind::Tokens => {
                tokens2 += u64::from(f.arg);
                text.extend_from_slice(&f.payload);
                if tokens2 == granted {
                    c.credit(2, 50).unwrap();
                    granted += 50;
                }
            }
            Kind::End => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(tokens2, 200, "every token arrives once credit comes");
    let local = Server::start(&strs(&synth));
    let (want, _) = text_of(&local, "the second stream runs on worker 1", &params(200));
    assert_eq!(text, want, "same text as a local run");
}

#[test]
fn issue10_a_queued_task_is_removed_unrun_and_past_the_bound_gets_429() {
    let synth = synthetic(1_000, 20_000);
    let mut extra = strs(&synth);
    extra.extend(["--admission-queue-max", "1"]);
    let s = stealing_server(&extra);
    let mut c = s.client();
    two_running(&s, &mut c, 0);
    // Both slots busy: stream 3 waits as a task (bound: 1 per worker, 2 in
    // all), stream 4 too, stream 5 is refused.
    c.request(3, 0, &params(10), "queued three").unwrap();
    c.request(4, 0, &params(10), "queued four").unwrap();
    c.request(5, 0, &params(10), "refused five").unwrap();
    let e = loop {
        let f = c.next_frame().unwrap();
        if f.stream_id == 5 {
            break f;
        }
    };
    assert_eq!((e.kind, e.arg), (Kind::Error, 429), "{}", e.text());
    c.cancel(3).unwrap();
    let end = loop {
        let f = c.next_frame().unwrap();
        if f.stream_id == 3 {
            break f;
        }
    };
    assert_eq!(
        (end.kind, end.aux),
        (Kind::End, 0),
        "cancelled before running: no token"
    );
    // Free the slots: stream 4 runs, stream 3 never does.
    c.cancel(1).unwrap();
    c.cancel(2).unwrap();
    let mut ended4 = false;
    while !ended4 {
        let f = c.next_frame().unwrap();
        assert_ne!(f.stream_id, 3, "a cancelled task ran: {f:?}");
        ended4 = f.stream_id == 4 && f.kind == Kind::End;
    }
    assert!(eventually(WAIT, || s.stat("active") == Some(0)));
}

#[test]
fn issue10_with_stealing_off_the_other_core_stays_idle() {
    let synth = synthetic(1_000, 2_000);
    let mut extra = strs(&synth);
    extra.extend(["--steal", "off"]);
    let s = stealing_server(&extra);
    let mut c = s.client();
    c.request(1, 0, &params(20), "first").unwrap();
    c.request(2, 0, &params(20), "second").unwrap();
    let mut ends = Vec::new();
    while ends.len() < 2 {
        let f = c.next_frame().unwrap();
        if f.kind == Kind::End {
            ends.push(f.stream_id);
        }
    }
    assert_eq!(ends, vec![1, 2], "the second waited for the first's slot");
    assert!(eventually(WAIT, || s.stat("requests") == Some(2)));
    assert_eq!(s.stat("stolen"), Some(0));
}
