//! The server's tasks and their results as bytes, for the MPI mirror (the
//! mirror wraps them in its rkyv messages; docs/SCHEDULER.md, "Messages").
//! Little-endian, length-prefixed; `decode` rejects anything it could not
//! have produced (short, long, bad UTF-8, an unknown tag), never panics.
//!
//! A task: `sslot u32, gen u32, params [32], chat u8, session_len u16,
//! prompt (u32 len + bytes; the session key first), messages (u32 len +
//! bytes)`. A result: `sslot u32, gen u32,
//! n u32, n × len u32, the tokens' bytes (u32 len + bytes), end u8 (0 none,
//! 1 finished + reason u8, 2 error + code u32 + message)`. Prompt buffers do
//! not travel back: the owner's slot makes new ones.

use std::time::Instant;

use cnse_proto::{FinishReason, ParamLimits, Params, PARAMS_BYTES};
use cnse_sched::WirePayload;

use super::{Batch, ServeTask, TaskEnd, TaskMsg};

/// Reads a wire buffer front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        Some(std::str::from_utf8(self.bytes()?).ok()?.to_string())
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

impl WirePayload for ServeTask {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sslot.to_le_bytes());
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&self.params.encode());
        out.push(u8::from(self.chat));
        out.extend_from_slice(&self.session_len.to_le_bytes());
        put_bytes(out, self.prompt.as_bytes());
        put_bytes(out, self.messages.as_bytes());
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let (sslot, gen) = (r.u32()?, r.u32()?);
        let block = r.take(PARAMS_BYTES)?;
        // The origin checked the parameters; checking again keeps a
        // garbled message from reaching a backend.
        let params = Params::parse(
            block,
            &ParamLimits {
                max_tokens_limit: u32::MAX,
            },
        )
        .ok()?
        .params;
        let chat = match r.u8()? {
            0 => false,
            1 => true,
            _ => return None,
        };
        let session_len = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
        let (prompt, messages) = (r.string()?, r.string()?);
        let key_fits = usize::from(session_len) <= prompt.len() && prompt.is_char_boundary(usize::from(session_len));
        (r.done() && key_fits).then_some(ServeTask {
            sslot,
            gen,
            params,
            prompt,
            session_len,
            messages,
            chat,
            arrived: Instant::now(),
        })
    }
}

impl WirePayload for TaskMsg {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.sslot.to_le_bytes());
        out.extend_from_slice(&self.gen.to_le_bytes());
        out.extend_from_slice(&(self.batch.lens.len() as u32).to_le_bytes());
        for l in &self.batch.lens {
            out.extend_from_slice(&l.to_le_bytes());
        }
        put_bytes(out, &self.batch.bytes);
        match &self.end {
            None => out.push(0),
            Some(TaskEnd::Finished(reason)) => {
                out.push(1);
                out.push(*reason as u8);
            }
            Some(TaskEnd::FinishedFailedOver(reason)) => {
                out.push(3);
                out.push(*reason as u8);
            }
            Some(TaskEnd::Error { code, message }) => {
                out.push(2);
                out.extend_from_slice(&code.to_le_bytes());
                put_bytes(out, message.as_bytes());
            }
        }
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let (sslot, gen) = (r.u32()?, r.u32()?);
        let n = r.u32()? as usize;
        // Every length takes 4 bytes: a count beyond the message is a lie.
        if n > r.0.len() / 4 {
            return None;
        }
        let lens: Vec<u32> = (0..n).map(|_| r.u32()).collect::<Option<_>>()?;
        let text = r.bytes()?;
        if lens.iter().map(|&l| l as usize).sum::<usize>() != text.len() {
            return None;
        }
        let end = match r.u8()? {
            0 => None,
            1 => Some(TaskEnd::Finished(FinishReason::from_u32(u32::from(r.u8()?))?)),
            2 => Some(TaskEnd::Error {
                code: r.u32()?,
                message: r.string()?,
            }),
            3 => Some(TaskEnd::FinishedFailedOver(FinishReason::from_u32(u32::from(r.u8()?))?)),
            _ => return None,
        };
        r.done().then_some(TaskMsg {
            sslot,
            gen,
            batch: Batch {
                bytes: text.to_vec(),
                lens,
            },
            end,
            buffers: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_crosses_whole_and_garbage_is_refused() {
        let t = ServeTask {
            sslot: 7,
            gen: 9,
            params: Params {
                max_tokens: 12,
                seed: 42,
                priority: 2,
                ..Params::default()
            },
            prompt: "k1héllo".into(),
            session_len: 2,
            messages: "[{\"role\":\"user\"}]".into(),
            chat: true,
            arrived: Instant::now(),
        };
        let mut b = Vec::new();
        t.encode(&mut b);
        let d = ServeTask::decode(&b).expect("decodes");
        assert_eq!((d.sslot, d.gen, d.chat, d.session_len), (7, 9, true, 2));
        assert_eq!(
            (d.prompt.as_str(), d.messages.as_str()),
            (t.prompt.as_str(), t.messages.as_str())
        );
        assert_eq!((d.params.max_tokens, d.params.seed, d.params.priority), (12, 42, 2));
        for cut in 0..b.len() {
            assert!(ServeTask::decode(&b[..cut]).is_none(), "cut at {cut}");
        }
        b.push(0);
        assert!(ServeTask::decode(&b).is_none(), "trailing byte");
    }

    #[test]
    fn a_result_crosses_whole_and_garbage_is_refused() {
        let mut batch = Batch::default();
        for t in ["a", "", "bcd"] {
            batch.push(t.as_bytes());
        }
        for end in [
            None,
            Some(TaskEnd::Finished(FinishReason::Stop)),
            Some(TaskEnd::FinishedFailedOver(FinishReason::Length)),
            Some(TaskEnd::Error {
                code: 502,
                message: "gone".into(),
            }),
        ] {
            let m = TaskMsg {
                sslot: 1,
                gen: 2,
                batch: Batch {
                    bytes: batch.bytes.clone(),
                    lens: batch.lens.clone(),
                },
                end: end.clone(),
                buffers: None,
            };
            let mut b = Vec::new();
            m.encode(&mut b);
            let d = TaskMsg::decode(&b).expect("decodes");
            assert_eq!((d.sslot, d.gen, &d.end), (1, 2, &end));
            assert_eq!(d.batch.tokens().collect::<Vec<_>>(), vec![&b"a"[..], b"", b"bcd"]);
            for cut in 0..b.len() {
                assert!(TaskMsg::decode(&b[..cut]).is_none(), "cut at {cut}");
            }
        }
    }
}
