//! The scheduler's messages between ranks, on arbitrary bytes: the rkyv
//! `Msg` (`cnse_sched::wire`, built without MPI through the `wire` feature)
//! and, inside it, the server's task and result payloads
//! (`cnse_server::tasks`, `WirePayload` for `ServeTask` and `TaskMsg`):
//! - never panics, at any alignment (MPI's buffers have none);
//! - a message it accepts re-encodes and decodes to the same message;
//! - a payload it accepts is canonical: it re-encodes to the same bytes,
//!   and a task's parameters are in range.
#![no_main]

use cnse_sched::wire::{self, Msg};
use cnse_sched::WirePayload;
use cnse_server::tasks::{ServeTask, TaskMsg};
use libfuzzer_sys::fuzz_target;

fn task_payload(bytes: &[u8]) {
    if let Some(t) = ServeTask::decode(bytes) {
        assert!(t.params.max_tokens > 0);
        assert!(t.params.temperature.is_finite() && t.params.temperature >= 0.0);
        assert!(t.params.top_p > 0.0 && t.params.top_p <= 1.0);
        let mut out = Vec::new();
        t.encode(&mut out);
        assert_eq!(out, bytes);
    }
}

fn result_payload(bytes: &[u8]) {
    if let Some(m) = TaskMsg::decode(bytes) {
        assert_eq!(
            m.batch.lens.iter().map(|&l| l as usize).sum::<usize>(),
            m.batch.bytes.len()
        );
        let mut out = Vec::new();
        m.encode(&mut out);
        assert_eq!(out, bytes);
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, data)) = input.split_first() else {
        return;
    };
    // The payload codecs alone, on the raw bytes.
    match sel % 4 {
        0 => task_payload(data),
        1 => result_payload(data),
        _ => {}
    }
    // The rkyv message, at an alignment the input chooses.
    let shift = usize::from(sel >> 4);
    let mut buf = vec![0u8; shift + data.len()];
    buf[shift..].copy_from_slice(data);
    let Ok(msg) = wire::decode(&buf[shift..]) else {
        return;
    };
    let bytes = wire::encode(&msg).expect("a message it read encodes");
    assert_eq!(wire::decode(&bytes).expect("and reads back"), msg);
    match &msg {
        Msg::Tasks { tasks, .. } => tasks.iter().for_each(|t| task_payload(&t.payload)),
        Msg::Results { results, .. } => results.iter().for_each(|r| result_payload(&r.payload)),
        _ => {}
    }
});
