//! The session's invariants, checked after every event by the seeded
//! simulator and by the fuzzer's scripts alike.

use super::io::SimIo;
use crate::session::Session;

/// The session's own invariants, whatever drives it: the transport used as
/// a kernel allows, tables within their bounds, every connection slot free
/// or open, the memory budget's count equal to the buffers held.
pub(super) fn check_session(session: &Session<SimIo>, conns_max: usize) -> Result<(), String> {
    let io = &session.io;
    if let Some(m) = io.misuse.first() {
        return Err(format!("transport misuse: {m}"));
    }
    let n = session.counters();
    let cfg = session.cfg();
    if n.streams_open as usize > cfg.streams_per_thread_max {
        return Err(format!(
            "{} streams open, limit {}",
            n.streams_open, cfg.streams_per_thread_max
        ));
    }
    let (conns_free, _) = session.free_slots();
    if conns_free + n.conns_open as usize != conns_max {
        return Err(format!(
            "{conns_free} free + {} open connection slots != {conns_max}",
            n.conns_open
        ));
    }
    session
        .check_live_list()
        .map_err(|e| format!("live connection list: {e}"))?;
    let (held, counted) = session.memory();
    if held != counted {
        return Err(format!(
            "memory budget counts {held} bytes held, buffers hold {counted}"
        ));
    }
    if io.open_sockets() != n.conns_open as usize {
        return Err(format!(
            "{} sockets open, {} connections",
            io.open_sockets(),
            n.conns_open
        ));
    }
    Ok(())
}

/// Nothing open, queued or held: every slot and socket is back.
pub(super) fn quiescent(session: &Session<SimIo>, conns_max: usize) -> bool {
    let n = session.counters();
    let (conns_free, streams_free) = session.free_slots();
    n.conns_open == 0
        && n.streams_open == 0
        && session.backend_active() == 0
        && session.admission_queue_len() == 0
        && conns_free == conns_max
        && streams_free == session.cfg().streams_per_thread_max
        && session.io.open_sockets() == 0
}
