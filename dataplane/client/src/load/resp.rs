//! The load generator's RESP mode: PING to a redis-compatible server
//! (redis-server, or anything that speaks RESP), so that redis is measured
//! by the same engine, threads, connections and clock as cnse-dp's PING
//! (`redis-benchmark` is a different client: its own batching, wake-ups and
//! timer, and under `--threads` its reported rate is its own). Requests go
//! out as RESP arrays, `inflight` pipelined per connection; every answer is
//! one line, in request order: `+PONG` ends the oldest PING, an error reply
//! (`-ERR ...`, `-NOAUTH ...`) ends it as an error, counted under
//! [`RESP_ERROR_CODE`]; anything else is not an answer to PING and loses
//! the connection.

use super::streams::{fail, finish, Ctx, Streams};

/// One PING, as redis-benchmark's `PING_MBULK` sends it.
pub(super) const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
/// The error code a RESP error reply is counted under (the report's
/// `ERROR 500`: the server answered, with an error).
pub const RESP_ERROR_CODE: u32 = 500;
/// Longest answer line kept: an error message longer than this is not
/// one redis sends.
const LINE_MAX: usize = 512;

/// One connection's answer parser: the line being collected.
#[derive(Debug)]
pub(super) struct RespRx {
    line: [u8; LINE_MAX],
    len: usize,
}

impl RespRx {
    pub(super) fn new() -> RespRx {
        RespRx {
            line: [0; LINE_MAX],
            len: 0,
        }
    }

    /// Feeds received bytes; `Err` when the connection cannot go on (an
    /// answer that is not PING's, or one with no PING waiting for it).
    pub(super) fn feed(
        &mut self,
        mut input: &[u8],
        st: &mut Streams,
        c: usize,
        now: u64,
        ctx: &mut Ctx,
    ) -> Result<(), ()> {
        while !input.is_empty() {
            let (part, rest, whole) = match input.iter().position(|&b| b == b'\n') {
                Some(eol) => (&input[..eol], &input[eol + 1..], true),
                None => (input, &input[input.len()..], false),
            };
            let end = self.len + part.len();
            if end > LINE_MAX {
                return Err(());
            }
            self.line[self.len..end].copy_from_slice(part);
            self.len = end;
            input = rest;
            if whole {
                let n = std::mem::take(&mut self.len);
                answer(&self.line[..n], st, c, now, ctx)?;
                if !st.alive {
                    return Ok(());
                }
            }
        }
        Ok(())
    }
}

/// One whole answer line (without its `\n`).
fn answer(line: &[u8], st: &mut Streams, c: usize, now: u64, ctx: &mut Ctx) -> Result<(), ()> {
    let line = line.strip_suffix(b"\r").ok_or(())?;
    let s = st.order.pop_front().ok_or(())? as usize;
    if ctx.phase.in_window(now) {
        ctx.stats.frames_in += 1;
    }
    match line.first() {
        Some(b'+') if line == b"+PONG" => finish(st, c, s, now, true, ctx),
        Some(b'-') => fail(st, c, s, now, RESP_ERROR_CODE, ctx),
        _ => return Err(()),
    }
    Ok(())
}
