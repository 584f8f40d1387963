//! One client stream's state: credit, the bounded queue of tokens produced
//! but not yet sent, and its phase. Pure: no ring, no socket.

use std::collections::VecDeque;
use std::time::Instant;

use cnse_proto::{FinishReason, Params};

/// Tokens produced by the backend and not yet framed, bounded in count and
/// bytes. Text lives in one reused byte buffer; token boundaries are kept
/// because credit counts tokens.
#[derive(Debug, Default)]
pub struct TokenQueue {
    bytes: Vec<u8>,
    head: usize,
    lens: VecDeque<u32>,
}

impl TokenQueue {
    pub fn with_capacity(bytes: usize, tokens: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(bytes),
            head: 0,
            lens: VecDeque::with_capacity(tokens),
        }
    }

    pub fn tokens(&self) -> usize {
        self.lens.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes.len() - self.head
    }

    pub fn push(&mut self, text: &[u8]) {
        self.make_room(text.len());
        self.bytes.extend_from_slice(text);
        self.lens.push_back(text.len() as u32);
    }

    /// Several tokens at once: token i is the next `lens[i]` bytes of
    /// `text` (which holds exactly those).
    pub fn push_run(&mut self, text: &[u8], lens: &[u32]) {
        debug_assert_eq!(lens.iter().map(|&n| n as usize).sum::<usize>(), text.len());
        self.make_room(text.len());
        self.bytes.extend_from_slice(text);
        self.lens.extend(lens);
    }

    /// Moves the unsent text to the front when that is half the buffer or
    /// saves growing it for `more` bytes.
    fn make_room(&mut self, more: usize) {
        if self.head > 0 && (self.head >= self.bytes.len() / 2 || self.bytes.len() + more > self.bytes.capacity()) {
            self.bytes.drain(..self.head);
            self.head = 0;
        }
    }

    /// Takes up to `max_tokens` tokens whose text fits in `max_bytes` (at
    /// least one token when `max_tokens > 0`, whatever its size, so a long
    /// token cannot wedge the stream). Returns the count and their text.
    pub fn take(&mut self, max_tokens: u64, max_bytes: usize) -> (u32, &[u8]) {
        let (n, len) = if self.lens.len() as u64 <= max_tokens && self.bytes() <= max_bytes {
            // All of it (the usual case): no walk over the lengths.
            (self.lens.len(), self.bytes())
        } else {
            let (mut n, mut len) = (0usize, 0usize);
            while (n as u64) < max_tokens && n < self.lens.len() {
                let l = self.lens[n] as usize;
                if n > 0 && len + l > max_bytes {
                    break;
                }
                len += l;
                n += 1;
            }
            (n, len)
        };
        if n == self.lens.len() {
            self.lens.clear();
        } else {
            self.lens.drain(..n);
        }
        let start = self.head;
        self.head += len;
        (n as u32, &self.bytes[start..start + len])
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.head = 0;
        self.lens.clear();
    }
}

/// Tokens the client allows the server to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Unlimited,
    Left(u64),
}

impl Credit {
    pub fn from_initial(arg: u32) -> Self {
        if arg == 0 {
            Credit::Unlimited
        } else {
            Credit::Left(u64::from(arg))
        }
    }

    pub fn available(self) -> u64 {
        match self {
            Credit::Unlimited => u64::MAX,
            Credit::Left(n) => n,
        }
    }

    pub fn grant(&mut self, more: u32) {
        if let Credit::Left(n) = self {
            *n = n.saturating_add(u64::from(more));
        }
    }

    pub fn spend(&mut self, n: u64) {
        if let Credit::Left(left) = self {
            assert!(*left >= n, "spent more credit than granted");
            *left -= n;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Slot unused.
    Free,
    /// Waiting in the admission queue.
    Queued,
    /// The backend is producing.
    Running,
    /// The backend ended; END follows once the queue is drained.
    Finished(FinishReason),
    /// The backend failed; ERROR follows (the queue is dropped).
    Failed,
}

#[derive(Debug)]
pub struct Stream {
    pub gen: u32,
    pub phase: Phase,
    pub conn: u32,
    pub client_id: u64,
    pub credit: Credit,
    /// Tokens framed so far (the next TOKENS frame's first index).
    pub sent: u64,
    pub queue: TokenQueue,
    pub paused: bool,
    /// When the ring wait that brought the REQUEST returned, and the same
    /// on the session's microsecond clock (`Tables::now_us`), which the
    /// per-stream timings use.
    pub arrived: Instant,
    pub arrived_us: u64,
    /// Stage timing: when the REQUEST passed its checks, and when the
    /// backend queued its first token.
    pub parsed: Instant,
    pub produced: Option<Instant>,
    /// When the first tokens were framed (session clock, microseconds).
    pub first_us: Option<u64>,
    /// When tokens were last framed for the client (or the stream started):
    /// a stream whose queued tokens wait past the stall timeout (no credit,
    /// or a client that does not read) ends with ERROR 504.
    pub last_us: u64,
    pub params: Params,
    /// Owned copy of the prompt while queued (buffer reused across streams),
    /// after the session key when there is one (`session_len`).
    pub prompt: String,
    /// Bytes at the front of `prompt` that are the request's session key
    /// (docs/PROTOCOL.md, "Session keys"; 0: none). One buffer for both
    /// keeps the hand-offs (tasks, steals) as they were.
    pub session_len: u16,
    pub error_code: u32,
    pub error_message: String,
    /// The HTTP front's side of the stream (inert on binary connections).
    pub http: crate::http::HttpStream,
    /// The scheduler's handle on this stream's task (kept after the task
    /// ends: the next task of this slot reuses its state).
    pub task: Option<cnse_sched::CancelToken>,
    /// The scheduler's id of this stream's task (an answer that carries no
    /// result, such as `Lost`, names it by this).
    pub task_id: u64,
    /// The task runs on another core, whose tokens arrive through the
    /// inbox (docs/SCHEDULER.md).
    pub remote: Option<Remote>,
    /// Bytes of this stream's prompt buffers that travel with its task
    /// (counted in the memory budget while away).
    pub away: usize,
    /// The backend continued the stream on another model server after
    /// tokens were sent (`Sink::failed_over`): END carries
    /// `END_FLAG_FAILED_OVER` for a connection granted the feature.
    pub failed_over: bool,
}

/// The session key and the prompt of a buffer that holds both
/// (`Stream::prompt` with `Stream::session_len`).
pub fn key_and_prompt(buf: &str, session_len: u16) -> (Option<&str>, &str) {
    let n = usize::from(session_len).min(buf.len());
    match buf.split_at_checked(n) {
        Some(("", prompt)) => (None, prompt),
        Some((key, prompt)) => (Some(key), prompt),
        None => (None, buf),
    }
}

/// The owner's side of a stream whose task runs on another core.
#[derive(Debug, Clone, Copy, Default)]
pub struct Remote {
    /// Tokens received from the runner so far.
    pub received: u64,
    /// The allowance last granted (tokens in all the runner may emit).
    pub granted: u64,
}

impl Stream {
    pub fn new(now: Instant, queue_bytes: usize, queue_tokens: usize) -> Self {
        Self {
            gen: 0,
            phase: Phase::Free,
            conn: 0,
            client_id: 0,
            credit: Credit::Unlimited,
            sent: 0,
            queue: TokenQueue::with_capacity(queue_bytes, queue_tokens),
            paused: false,
            arrived: now,
            arrived_us: 0,
            parsed: now,
            produced: None,
            first_us: None,
            last_us: 0,
            params: Params::default(),
            prompt: String::new(),
            session_len: 0,
            error_code: 0,
            error_message: String::new(),
            http: crate::http::HttpStream::default(),
            task: None,
            task_id: 0,
            remote: None,
            away: 0,
            failed_over: false,
        }
    }

    /// Live and producing or about to.
    pub fn is_open(&self) -> bool {
        self.phase != Phase::Free
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_respects_token_and_byte_limits() {
        let mut q = TokenQueue::with_capacity(64, 8);
        for t in ["a", "bb", "ccc", "dddd"] {
            q.push(t.as_bytes());
        }
        assert_eq!(q.take(3, 100), (3, &b"abbccc"[..]));
        assert_eq!(q.tokens(), 1);
        q.push(b"e");
        assert_eq!(
            q.take(10, 2),
            (1, &b"dddd"[..]),
            "one token even if over the byte limit"
        );
        assert_eq!(q.take(10, 100), (1, &b"e"[..]));
        assert_eq!(q.take(10, 100), (0, &b""[..]));
    }

    #[test]
    fn a_run_of_tokens_queues_as_its_tokens_one_by_one() {
        let mut q = TokenQueue::with_capacity(64, 8);
        q.push(b"x");
        q.push_run(b"abbccc", &[1, 2, 3]);
        assert_eq!((q.tokens(), q.bytes()), (4, 7));
        assert_eq!(q.take(2, 100), (2, &b"xa"[..]));
        assert_eq!(q.take(10, 3), (1, &b"bb"[..]), "token boundaries kept");
        q.push_run(b"", &[]);
        assert_eq!(q.take(10, 100), (1, &b"ccc"[..]));
        assert_eq!(q.take(10, 100), (0, &b""[..]));
    }

    #[test]
    fn queue_reuses_its_buffer() {
        let mut q = TokenQueue::with_capacity(16, 16);
        let cap = q.bytes.capacity();
        for _ in 0..1000 {
            q.push(b"abcd");
            q.push(b"efgh");
            let _ = q.take(2, 100);
        }
        assert_eq!(q.bytes.capacity(), cap);
    }

    #[test]
    fn credit_counts_tokens() {
        let mut c = Credit::from_initial(3);
        assert_eq!(c.available(), 3);
        c.spend(3);
        assert_eq!(c.available(), 0);
        c.grant(2);
        assert_eq!(c.available(), 2);
        let mut u = Credit::from_initial(0);
        u.spend(1000);
        assert_eq!(u.available(), u64::MAX);
    }
}
