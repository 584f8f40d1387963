//! The soak's population: one thread per actor, each a loop of blocking
//! clients until told to stop. Good streamers and slow readers check every
//! stream's text against what the synthetic backend must produce
//! (`expected_text(prompt, seed, max_tokens)`); cancellers check the END
//! that a CANCEL must bring; garbage senders check that the server answers
//! a violation with its ERROR and closes; churners connect and leave.
//! Outcomes go to the shared [`Tally`]; a failure also keeps its reason.

use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cnse_backend::synthetic::expected_text;
use cnse_client::{Client, ClientError, OwnedFrame};
use cnse_proto::{FinishReason, Kind, Params};

use super::hostile;
use super::rng::Rng;

/// One read's limit: a stream that sends nothing for this long is lost.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Streams a good streamer keeps open at once on its connection.
const GOOD_CONCURRENT: usize = 4;
/// Failure reasons kept (the counters keep counting past it).
const FAILURES_KEPT: usize = 32;

/// The kinds of actor, in the order of [`Tally`]'s rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Good,
    Canceller,
    Slow,
    Garbage,
    Churn,
}

pub const ROLES: [Role; 5] = [Role::Good, Role::Canceller, Role::Slow, Role::Garbage, Role::Churn];

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Good => "good",
            Role::Canceller => "cancel",
            Role::Slow => "slow",
            Role::Garbage => "garbage",
            Role::Churn => "churn",
        }
    }
}

/// Outcomes so far, per role: passed and failed; plus the cancellers'
/// streams that finished before their CANCEL arrived (allowed, and
/// checked as whole streams), and the first failure reasons.
#[derive(Default)]
pub struct Tally {
    ok: [AtomicU64; 5],
    failed: [AtomicU64; 5],
    pub finished_before_cancel: AtomicU64,
    /// Good and slow tokens checked, and cancelled streams' tokens checked.
    pub tokens_checked: AtomicU64,
    reasons: Mutex<Vec<String>>,
}

impl Tally {
    pub fn ok(&self, r: Role) -> u64 {
        self.ok[r as usize].load(Relaxed)
    }

    pub fn failed(&self, r: Role) -> u64 {
        self.failed[r as usize].load(Relaxed)
    }

    pub fn reasons(&self) -> Vec<String> {
        self.reasons.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn pass(&self, r: Role) {
        self.ok[r as usize].fetch_add(1, Relaxed);
    }

    fn fail(&self, r: Role, why: String) {
        self.failed[r as usize].fetch_add(1, Relaxed);
        if let Ok(mut v) = self.reasons.lock() {
            if v.len() < FAILURES_KEPT {
                v.push(format!("{}: {why}", r.name()));
            }
        }
    }
}

/// What every actor shares.
pub struct Ctx {
    pub addr: SocketAddr,
    pub stop: AtomicBool,
    pub tally: Tally,
    /// Largest max_tokens of a good stream (the model's pace sets how long
    /// a stream takes).
    pub max_tokens: u32,
}

impl Ctx {
    fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

/// Runs `role` until `ctx.stop`; a good streamer finishes its open streams
/// first.
pub fn run(role: Role, ctx: Arc<Ctx>, seed: u64) {
    let mut rng = Rng::new(seed);
    while !ctx.stopping() {
        match role {
            Role::Good => good_connection(&ctx, &mut rng),
            Role::Canceller => cancel_connection(&ctx, &mut rng),
            Role::Slow => slow_stream(&ctx, &mut rng),
            Role::Garbage => hostile::garbage_connection(&ctx, &mut rng),
            Role::Churn => hostile::churn_connection(&ctx, &mut rng),
        }
        // Actors that do not wait on a paced stream would spin on a shared
        // 2-core box: a short pause keeps the population's rate bounded.
        let pause_ms = match role {
            Role::Good | Role::Slow => 0,
            Role::Canceller => 5,
            Role::Garbage => 20,
            Role::Churn => 10,
        };
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
}

impl Ctx {
    pub(super) fn pass(&self, r: Role) {
        self.tally.pass(r);
    }

    pub(super) fn fail(&self, r: Role, why: String) {
        self.tally.fail(r, why);
    }

    pub(super) fn connect(&self, r: Role) -> Option<Client> {
        match Client::connect_hello(self.addr, b"", READ_TIMEOUT) {
            Ok((c, _)) => Some(c),
            Err(e) => {
                self.fail(r, format!("connect and HELLO: {e}"));
                std::thread::sleep(Duration::from_millis(100));
                None
            }
        }
    }
}

/// A prompt of 1 to ~40 words, sometimes with multi-byte characters.
pub fn prompt(rng: &mut Rng) -> String {
    const WORDS: [&str; 12] = [
        "soak", "stream", "token", "café", "river", "日本", "credit", "naïve", "ring", "über", "loop", "wave",
    ];
    let n = 1 + rng.below(40) as usize;
    let mut p = String::with_capacity(n * 8);
    for i in 0..n {
        if i > 0 {
            p.push(' ');
        }
        p.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
    }
    p
}

/// A stream this client opened and has not seen end.
struct Open {
    id: u64,
    prompt: String,
    seed: u64,
    max_tokens: u32,
    /// Credit window (0: unlimited) and tokens received since the last grant.
    credit: u32,
    unacked: u32,
    text: Vec<u8>,
    tokens: u64,
}

impl Open {
    /// Opens stream `id` with a random prompt, seed and length, and a
    /// credit window of `credit` (None: unlimited or 4-63 at random).
    fn start(
        c: &mut Client,
        id: u64,
        rng: &mut Rng,
        max_tokens_max: u32,
        credit: Option<u32>,
    ) -> Result<Open, ClientError> {
        let o = Open {
            id,
            prompt: prompt(rng),
            seed: rng.next(),
            max_tokens: 1 + rng.below(u64::from(max_tokens_max)) as u32,
            credit: credit.unwrap_or_else(|| if rng.below(2) == 0 { 0 } else { 4 + rng.below(60) as u32 }),
            unacked: 0,
            text: Vec::new(),
            tokens: 0,
        };
        let p = Params {
            max_tokens: o.max_tokens,
            seed: o.seed,
            ..Params::default()
        };
        c.request(id, o.credit, &p, &o.prompt)?;
        Ok(o)
    }

    /// Takes a TOKENS frame: checks its index, grants credit at half the
    /// window.
    fn tokens(&mut self, c: &mut Client, f: &OwnedFrame) -> Result<(), String> {
        if f.aux != self.tokens {
            return Err(format!(
                "stream {}: TOKENS at index {} after {} tokens",
                self.id, f.aux, self.tokens
            ));
        }
        self.tokens += u64::from(f.arg);
        self.text.extend_from_slice(&f.payload);
        if self.credit > 0 {
            self.unacked += f.arg;
            if self.unacked >= (self.credit / 2).max(1) {
                c.credit(self.id, self.unacked).map_err(|e| format!("CREDIT: {e}"))?;
                self.unacked = 0;
            }
        }
        Ok(())
    }

    /// Checks a whole stream's END: reason length, every token, the exact
    /// text.
    fn check_whole(&self, f: &OwnedFrame) -> Result<(), String> {
        let want_tokens = u64::from(self.max_tokens);
        if f.kind == Kind::Error {
            return Err(format!("stream {}: ERROR {} {}", self.id, f.arg, f.text()));
        }
        if FinishReason::from_u32(f.arg) != Some(FinishReason::Length) {
            return Err(format!("stream {}: END reason {} (want length)", self.id, f.arg));
        }
        if self.tokens != want_tokens || f.aux != want_tokens {
            return Err(format!(
                "stream {}: {} tokens received, END says {}, want {want_tokens}",
                self.id, self.tokens, f.aux
            ));
        }
        if self.text != expected_text(&self.prompt, self.seed, self.max_tokens) {
            return Err(format!(
                "stream {}: text differs from the model's for seed {}",
                self.id, self.seed
            ));
        }
        Ok(())
    }
}

/// One connection of a good streamer: up to 4 streams at once, 1 to 40 in
/// all, each checked whole. A stream that ends wrong, twice (a frame after
/// its END) or never (the connection fails or goes silent) is a failure.
fn good_connection(ctx: &Ctx, rng: &mut Rng) {
    let Some(mut c) = ctx.connect(Role::Good) else {
        return;
    };
    let total = 1 + rng.below(40);
    let mut open: Vec<Open> = Vec::with_capacity(GOOD_CONCURRENT);
    let (mut next_id, mut started) = (1u64, 0u64);
    loop {
        while open.len() < GOOD_CONCURRENT && started < total && !ctx.stopping() {
            match Open::start(&mut c, next_id, rng, ctx.max_tokens, None) {
                Ok(o) => open.push(o),
                Err(e) => {
                    ctx.fail(Role::Good, format!("REQUEST: {e}"));
                    return lose_all(ctx, Role::Good, &open, "the connection failed");
                }
            }
            next_id += 1;
            started += 1;
        }
        if open.is_empty() {
            return;
        }
        let f = match c.next_frame() {
            Ok(f) => f,
            Err(e) => return lose_all(ctx, Role::Good, &open, &format!("no END: {e}")),
        };
        let Some(i) = open.iter().position(|o| o.id == f.stream_id) else {
            let what = if f.stream_id < next_id {
                "after its END"
            } else {
                "never opened"
            };
            ctx.fail(
                Role::Good,
                format!("{:?} on stream {} {what} (duplicate)", f.kind, f.stream_id),
            );
            return lose_all(ctx, Role::Good, &open, "abandoned after a duplicate");
        };
        match f.kind {
            Kind::Tokens => {
                if let Err(e) = open[i].tokens(&mut c, &f) {
                    ctx.fail(Role::Good, e);
                    open.swap_remove(i);
                    return lose_all(ctx, Role::Good, &open, "abandoned after a wrong stream");
                }
            }
            Kind::End | Kind::Error => {
                let o = open.swap_remove(i);
                match o.check_whole(&f) {
                    Ok(()) => {
                        ctx.tally.tokens_checked.fetch_add(o.tokens, Relaxed);
                        ctx.pass(Role::Good);
                    }
                    Err(e) => ctx.fail(Role::Good, e),
                }
            }
            k => {
                ctx.fail(Role::Good, format!("{k:?} on stream {}", f.stream_id));
                return lose_all(ctx, Role::Good, &open, "abandoned after a wrong frame");
            }
        }
    }
}

fn lose_all(ctx: &Ctx, r: Role, open: &[Open], why: &str) {
    for o in open {
        ctx.fail(r, format!("stream {} lost ({why})", o.id));
    }
}

/// One connection of a canceller: streams of 100-400 tokens, each cancelled
/// at once or after a few TOKENS frames; END must say cancelled (or length,
/// if the stream won the race, then whole), its token count must be what
/// arrived and the text a prefix of the model's. One stream in eight is left
/// by closing the connection instead (the server cancels it).
fn cancel_connection(ctx: &Ctx, rng: &mut Rng) {
    let Some(mut c) = ctx.connect(Role::Canceller) else {
        return;
    };
    let streams = 1 + rng.below(10);
    for id in 1..=streams {
        if ctx.stopping() {
            break;
        }
        match cancel_one(ctx, &mut c, rng, id) {
            Ok(true) => {}
            Ok(false) => return, // left by closing the connection
            Err(e) => return ctx.fail(Role::Canceller, e),
        }
    }
    let _ = c.shutdown(Shutdown::Both);
}

/// One cancelled stream on `id`; Ok(false) when it was left by a close.
fn cancel_one(ctx: &Ctx, c: &mut Client, rng: &mut Rng, id: u64) -> Result<bool, String> {
    let prompt = prompt(rng);
    let p = Params {
        max_tokens: 100 + rng.below(300) as u32,
        seed: rng.next(),
        ..Params::default()
    };
    c.request(id, 0, &p, &prompt).map_err(|e| format!("REQUEST: {e}"))?;
    let frames_first = rng.below(5);
    let leave = rng.below(8) == 0;
    let mut text = Vec::new();
    let mut tokens = 0u64;
    let mut cancelled = false;
    let mut seen = 0u64;
    loop {
        if !cancelled && seen >= frames_first {
            if leave {
                let _ = c.shutdown(Shutdown::Both);
                ctx.pass(Role::Canceller);
                return Ok(false);
            }
            c.cancel(id).map_err(|e| format!("CANCEL: {e}"))?;
            cancelled = true;
        }
        let f = c
            .next_frame()
            .map_err(|e| format!("stream {id}: no END after CANCEL: {e}"))?;
        if f.stream_id != id {
            return Err(format!("{:?} on stream {} while cancelling {id}", f.kind, f.stream_id));
        }
        seen += 1;
        match f.kind {
            Kind::Tokens if f.aux == tokens => {
                tokens += u64::from(f.arg);
                text.extend_from_slice(&f.payload);
            }
            Kind::Tokens => return Err(format!("stream {id}: TOKENS at {} after {tokens}", f.aux)),
            Kind::End => {
                let want = expected_text(&prompt, p.seed, p.max_tokens);
                let reason = FinishReason::from_u32(f.arg);
                let whole = reason == Some(FinishReason::Length) && text == want;
                let cut = reason == Some(FinishReason::Cancelled) && want.starts_with(&text);
                if f.aux != tokens || !(whole || cut) {
                    return Err(format!(
                        "stream {id}: END reason {} with {} tokens after {tokens} received (prefix of the model's text: {})",
                        f.arg,
                        f.aux,
                        want.starts_with(&text)
                    ));
                }
                if whole {
                    ctx.tally.finished_before_cancel.fetch_add(1, Relaxed);
                }
                ctx.tally.tokens_checked.fetch_add(tokens, Relaxed);
                ctx.pass(Role::Canceller);
                return Ok(true);
            }
            _ => return Err(format!("stream {id}: {:?} {} {}", f.kind, f.arg, f.text())),
        }
    }
}

/// A slow reader: one stream with a small credit window (1-4 tokens),
/// taking its frames 2-20 ms apart; the stream must still come whole.
fn slow_stream(ctx: &Ctx, rng: &mut Rng) {
    let Some(mut c) = ctx.connect(Role::Slow) else {
        return;
    };
    let window = 1 + rng.below(4) as u32;
    let mut o = match Open::start(&mut c, 1, rng, ctx.max_tokens, Some(window)) {
        Ok(o) => o,
        Err(e) => return ctx.fail(Role::Slow, format!("REQUEST: {e}")),
    };
    let delay = Duration::from_millis(2 + rng.below(19));
    let r = loop {
        std::thread::sleep(delay);
        let f = match c.next_frame() {
            Ok(f) => f,
            Err(e) => break Err(format!("stream 1 lost: {e}")),
        };
        if f.stream_id != 1 {
            break Err(format!("{:?} on stream {} (not open)", f.kind, f.stream_id));
        }
        match f.kind {
            Kind::Tokens => {
                if let Err(e) = o.tokens(&mut c, &f) {
                    break Err(e);
                }
            }
            Kind::End | Kind::Error => break o.check_whole(&f),
            k => break Err(format!("{k:?} on stream 1")),
        }
    };
    match r {
        Ok(()) => {
            ctx.tally.tokens_checked.fetch_add(o.tokens, Relaxed);
            ctx.pass(Role::Slow);
        }
        Err(e) => ctx.fail(Role::Slow, e),
    }
}
