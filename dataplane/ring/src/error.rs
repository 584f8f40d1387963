use std::io;

/// A failed ring operation: the operation and the errno.
#[derive(Debug, thiserror::Error)]
#[error("io_uring {op}: {source}")]
pub struct RingError {
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl RingError {
    pub fn new(op: &'static str, source: io::Error) -> Self {
        RingError { op, source }
    }

    /// From a completion's negative result.
    pub fn from_result(op: &'static str, result: i32) -> Self {
        debug_assert!(result < 0);
        RingError {
            op,
            source: io::Error::from_raw_os_error(-result),
        }
    }

    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}
