//! `cnse._cnse`: the native half of the `cnse` Python package, a CNSE v1
//! client over `cnse-client` (see `dataplane/python/README.md` and
//! `docs/PYTHON.md`).
//!
//! One connection is one [`core::Core`]: a reader thread owns the
//! receiving half of the socket (a `cnse_client::Client` after its
//! handshake) and fills per-stream buffers bounded by credit; Python
//! threads and asyncio tasks poll those buffers and send through the
//! `cnse_client::Writer` half. Python is never called with a core lock
//! held, and blocking waits release the GIL.
//!
//! | file | what |
//! |---|---|
//! | `core.rs` | locks, opening streams, sending, the handshake's queue, failure fan-out |
//! | `table.rs` | stream, ping and handshake tables; polling, parking, credit to grant |
//! | `eventfd.rs` | the eventfd that wakes the asyncio loop |
//! | `reader.rs` | the reader thread: handshake, frame dispatch, timeouts |
//! | `utf8.rs` | text assembled across frames that split a character |
//! | `py.rs` | `Connection`: blocking and async entry points, asyncio wake-ups |
//! | `streams.rs` | `Stream`, `AsyncStream`, and the `Await` awaitable |
//! | `error.rs` | `SdkError`, mapped onto `cnse/_errors.py` |

mod core;
mod error;
mod eventfd;
mod py;
mod reader;
mod streams;
mod table;
mod utf8;

use pyo3::prelude::*;

#[pymodule]
mod _cnse {
    #[pymodule_export]
    use crate::py::{_wake, Connection};
    #[pymodule_export]
    use crate::streams::{AsyncStream, Await, Stream};

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("WINDOW_MAX", crate::core::WINDOW_MAX)?;
        m.add("STREAMS_MAX", crate::core::STREAMS_MAX)?;
        m.add("PINGS_MAX", crate::core::PINGS_MAX)?;
        Ok(())
    }
}
