//! The messages between ranks: one rkyv-archived [`Msg`] per MPI message,
//! all on one tag. rkyv 0.8 reads an archive in place only from 16-byte
//! aligned bytes, and MPI hands back a plain `Vec<u8>`, so [`decode`]
//! copies into an aligned buffer before `access` validates it (a truncated
//! or garbled message is an error, never a panic).

use rkyv::rancor;
use rkyv::util::AlignedVec;

/// Largest message accepted (a batch of tasks or results): bigger ones are
/// refused when encoded and when received.
pub const MSG_BYTES_MAX: usize = 16 << 20;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct WireTask {
    /// The task's id on the rank that sent it (its origin).
    pub id: u64,
    pub owner: u32,
    pub priority: u32,
    /// The payload, encoded by `WirePayload::encode`.
    pub payload: Vec<u8>,
}

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub struct WireResult {
    /// The id on the origin rank (`WireTask::id`).
    pub id: u64,
    /// `route::Status` as a byte.
    pub status: u8,
    /// Empty when there is no result (cancelled before it ran).
    pub payload: Vec<u8>,
    /// The task's last result; earlier ones were streamed while it ran.
    pub last: bool,
}

/// Every message carries the epoch (one `bench-scaling` policy run, or the
/// server's one long epoch): a message of an older epoch is dropped.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq)]
pub enum Msg {
    /// Sent to every peer each exchange interval, and at once when `done`
    /// changes; doubles as the heartbeat.
    Load {
        epoch: u32,
        queued: u32,
        free_slots: u32,
        done: bool,
    },
    /// An idle rank asks a busy one for up to `want` tasks.
    StealRequest { epoch: u32, want: u32 },
    /// The answer to a steal request: half the victim's queue (maybe none).
    Tasks { epoch: u32, tasks: Vec<WireTask> },
    /// Results of tasks the receiver sent here.
    Results { epoch: u32, results: Vec<WireResult> },
    /// The sender's owners cancelled these of its tasks that run here.
    Cancel { epoch: u32, ids: Vec<u64> },
    /// End of epoch: the sender's report (bench-scaling), to rank 0.
    Report { epoch: u32, bytes: Vec<u8> },
    /// Rank 0 is leaving a job in which a rank was given up: the others may
    /// leave too (none of them can run MPI_Finalize, which would wait for
    /// the lost rank).
    Bye { epoch: u32 },
}

impl Msg {
    pub fn epoch(&self) -> u32 {
        match self {
            Msg::Load { epoch, .. }
            | Msg::StealRequest { epoch, .. }
            | Msg::Tasks { epoch, .. }
            | Msg::Results { epoch, .. }
            | Msg::Cancel { epoch, .. }
            | Msg::Report { epoch, .. }
            | Msg::Bye { epoch } => *epoch,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("message of {0} bytes is larger than {MSG_BYTES_MAX}")]
    TooLarge(usize),
    #[error("bad message: {0}")]
    Bad(String),
}

pub fn encode(msg: &Msg) -> Result<Vec<u8>, WireError> {
    let bytes = rkyv::to_bytes::<rancor::Error>(msg).map_err(|e| WireError::Bad(e.to_string()))?;
    if bytes.len() > MSG_BYTES_MAX {
        return Err(WireError::TooLarge(bytes.len()));
    }
    Ok(bytes.into_vec())
}

/// Validates and reads a received message (copied into an aligned buffer
/// first: MPI's receive buffer has no alignment promise).
pub fn decode(bytes: &[u8]) -> Result<Msg, WireError> {
    if bytes.len() > MSG_BYTES_MAX {
        return Err(WireError::TooLarge(bytes.len()));
    }
    let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let archived = rkyv::access::<ArchivedMsg, rancor::Error>(&aligned).map_err(|e| WireError::Bad(e.to_string()))?;
    rkyv::deserialize::<Msg, rancor::Error>(archived).map_err(|e| WireError::Bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Msg {
        Msg::Tasks {
            epoch: 3,
            tasks: vec![WireTask {
                id: 7,
                owner: 1,
                priority: 2,
                payload: vec![1, 2, 3],
            }],
        }
    }

    #[test]
    fn round_trip_from_unaligned_bytes() {
        let bytes = encode(&sample()).unwrap();
        // Shift by one byte so the input is certainly misaligned.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        assert_eq!(decode(&shifted[1..]).unwrap(), sample());
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let bytes = encode(&sample()).unwrap();
        assert!(decode(&bytes[..bytes.len() / 2]).is_err());
        assert!(decode(&[0xff; 40]).is_err());
        assert!(decode(&[]).is_err());
    }
}
