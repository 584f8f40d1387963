//! Where a finished task's result goes: a task that arrived here goes back
//! to its owner core's inbox; a task another rank sent here goes to the MPI
//! communication thread's outbox, which returns it to that rank. Runners
//! call [`Router::complete`] and never look at where a task came from.

use std::sync::Arc;
use std::time::Instant;

use crate::{Claimed, Inbox, InboxFull, Inboxes, Wake};

/// Where a task came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Pushed on this rank: the result goes to `Task::owner`'s inbox.
    Local,
    /// Sent by rank `rank`, where it is task `id`.
    Remote { rank: u32, id: u64 },
}

/// What the scheduler carries when the MPI mirror may move tasks.
#[derive(Debug)]
pub struct Job<T> {
    pub origin: Origin,
    pub payload: T,
}

impl<T> Job<T> {
    pub fn local(payload: T) -> Self {
        Self {
            origin: Origin::Local,
            payload,
        }
    }
}

/// How a task ended, as its owner learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// A cancel reached it: removed while queued, or stopped while running.
    Cancelled = 1,
    /// The rank running it stopped answering (the server's ERROR 502).
    Lost = 2,
}

impl Status {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::Cancelled),
            2 => Some(Status::Lost),
            _ => None,
        }
    }
}

/// A result on its way to the owner core.
#[derive(Debug)]
pub struct Outcome<R> {
    pub id: u64,
    pub owner: usize,
    pub enqueued_at: Instant,
    pub status: Status,
    pub result: Option<R>,
    /// The rank that ran it.
    pub ran_on: u32,
    /// The task's last result (`Router::complete`); false for the ones it
    /// streamed before (`Router::emit`). One task's results arrive in order.
    pub last: bool,
}

/// A result for another rank, waiting for the communication thread.
#[derive(Debug)]
pub struct RemoteDone<R> {
    pub rank: u32,
    pub id: u64,
    pub status: Status,
    pub result: Option<R>,
    pub last: bool,
}

pub struct Router<R, W: Wake> {
    pub rank: u32,
    pub local: Arc<Inboxes<Outcome<R>, W>>,
    /// The communication thread's outbox (bounded like every inbox).
    pub remote: Arc<Inbox<RemoteDone<R>>>,
}

impl<R, W: Wake> Clone for Router<R, W> {
    fn clone(&self) -> Self {
        Self {
            rank: self.rank,
            local: self.local.clone(),
            remote: self.remote.clone(),
        }
    }
}

/// The result could not be queued (the inbox is full): the task stays
/// running until the caller tries again.
pub struct Busy<T, R>(pub Claimed<Job<T>>, pub Option<R>);

impl<R, W: Wake> Router<R, W> {
    /// Streams one result of a task that goes on running (the server's
    /// token batches): to the owner's inbox, or towards the rank the task
    /// came from. A full inbox hands it back; the runner pauses and tries
    /// again.
    pub fn emit<T>(&self, c: &Claimed<Job<T>>, result: R) -> Result<(), InboxFull<R>> {
        match c.task.payload.origin {
            Origin::Local => {
                let o = Outcome {
                    id: c.task.id,
                    owner: c.task.owner,
                    enqueued_at: c.task.enqueued_at,
                    status: Status::Ok,
                    result: Some(result),
                    ran_on: self.rank,
                    last: false,
                };
                self.local
                    .send(c.task.owner, o)
                    .map_err(|InboxFull(o)| InboxFull(o.result.expect("an emitted outcome carries its result")))
            }
            Origin::Remote { rank, id } => {
                let d = RemoteDone {
                    rank,
                    id,
                    status: Status::Ok,
                    result: Some(result),
                    last: false,
                };
                self.remote
                    .push(d)
                    .map(|_| ())
                    .map_err(|InboxFull(d)| InboxFull(d.result.expect("an emitted result carries its result")))
            }
        }
    }

    /// Hands a claimed task's result to whoever waits for it, then finishes
    /// the task (so a drain never ends before its result is queued).
    pub fn complete<T>(&self, c: Claimed<Job<T>>, result: Option<R>) -> Result<(), Busy<T, R>> {
        let status = if c.cancel_requested() {
            Status::Cancelled
        } else {
            Status::Ok
        };
        match c.task.payload.origin {
            Origin::Local => {
                let o = Outcome {
                    id: c.task.id,
                    owner: c.task.owner,
                    enqueued_at: c.task.enqueued_at,
                    status,
                    result,
                    ran_on: self.rank,
                    last: true,
                };
                match self.local.send(c.task.owner, o) {
                    Ok(()) => {}
                    Err(InboxFull(o)) => return Err(Busy(c, o.result)),
                }
            }
            Origin::Remote { rank, id } => {
                let d = RemoteDone {
                    rank,
                    id,
                    status,
                    result,
                    last: true,
                };
                if let Err(InboxFull(d)) = self.remote.push(d) {
                    return Err(Busy(c, d.result));
                }
            }
        }
        c.finish();
        Ok(())
    }
}
