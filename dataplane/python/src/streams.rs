//! The stream classes and the awaitable of the async API.
//!
//! - [`Stream`]: a blocking iterator of text; each `next` takes everything
//!   that arrived since the previous one (credit goes back as it is taken).
//! - [`AsyncStream`]: the same as an async iterator.
//! - [`Await`]: what the async methods return. `await` polls the core:
//!   a ready answer ends it at once (no trip through the event loop);
//!   otherwise it yields a parked asyncio future to the task and polls
//!   again when that future is resolved.

use pyo3::exceptions::{PyRuntimeError, PyStopAsyncIteration, PyStopIteration};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyFloat, PyString};

use crate::core::{Core, Key, Polled, Value, Waiter};
use crate::py::{completion, to_py_err, wait_key, Connection};

/// Tokens of one request as they arrive: iterate for text, then read
/// `result` (a `cnse.Completion` with the END facts).
#[pyclass(module = "cnse._cnse", frozen)]
pub struct Stream {
    /// Keeps the connection open while the stream lives.
    conn: Py<Connection>,
    id: u64,
    result: PyOnceLock<Py<PyAny>>,
}

impl Stream {
    pub(crate) fn new(conn: Py<Connection>, id: u64) -> Self {
        Stream {
            conn,
            id,
            result: PyOnceLock::new(),
        }
    }

    fn core(&self) -> &Core {
        &self.conn.get().core
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.core().release(self.id);
    }
}

/// Turns a streaming poll result into the next item: `Some(text)`, `None`
/// at the END (after storing the completion in `result`), or the error.
fn next_item(
    py: Python<'_>,
    id: u64,
    result: &PyOnceLock<Py<PyAny>>,
    got: Result<Value, crate::error::SdkError>,
) -> PyResult<Option<Py<PyAny>>> {
    match got {
        Ok(Value::Text(t)) => Ok(Some(PyString::new(py, &t).into_any().unbind())),
        Ok(Value::End(facts, text)) => {
            let c = completion(py, id, facts, text)?;
            let _ = result.set(py, c);
            Ok(None)
        }
        Ok(_) => Err(PyRuntimeError::new_err("streaming poll gave a non-stream value")),
        Err(e) => Err(to_py_err(py, e)),
    }
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        if self.result.get(py).is_some() {
            return Ok(None);
        }
        let got = wait_key(py, self.core(), Key::Stream(self.id))?;
        next_item(py, self.id, &self.result, got)
    }

    /// Asks the server to stop; iteration goes on to the END (reason 2).
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        self.core().cancel(self.id).map_err(|e| to_py_err(py, e))
    }

    /// Cancels the stream if it is still open and forgets it.
    fn close(&self) {
        self.core().release(self.id);
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_exc))]
    fn __exit__(&self, _exc: &Bound<'_, pyo3::types::PyTuple>) {
        self.close();
    }

    /// The stream id on the connection.
    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Tokens received so far.
    #[getter]
    fn tokens(&self) -> u64 {
        self.core().stream_tokens(self.id)
    }

    /// The `cnse.Completion` once the iteration reached the END, else None.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.result.get(py).map(|c| c.clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<cnse.Stream id={} tokens={}{}>",
            self.id,
            self.core().stream_tokens(self.id),
            if self.result.get(py).is_some() { " ended" } else { "" }
        )
    }
}

/// Tokens of one request as they arrive, for `async for`; then `result`.
#[pyclass(module = "cnse._cnse", frozen)]
pub struct AsyncStream {
    conn: Py<Connection>,
    id: u64,
    result: PyOnceLock<Py<PyAny>>,
}

impl AsyncStream {
    pub(crate) fn new(conn: Py<Connection>, id: u64) -> Self {
        AsyncStream {
            conn,
            id,
            result: PyOnceLock::new(),
        }
    }
}

impl Drop for AsyncStream {
    fn drop(&mut self) {
        let conn = self.conn.get();
        conn.forget_future(Key::Stream(self.id));
        conn.core.release(self.id);
    }
}

#[pymethods]
impl AsyncStream {
    fn __aiter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __anext__(slf: &Bound<'_, Self>) -> Await {
        let this = slf.get();
        Await::new(
            this.conn.clone_ref(slf.py()),
            Key::Stream(this.id),
            AwaitKind::Next(slf.clone().unbind()),
        )
    }

    /// Asks the server to stop; iteration goes on to the END (reason 2).
    fn cancel(&self, py: Python<'_>) -> PyResult<()> {
        self.conn.get().core.cancel(self.id).map_err(|e| to_py_err(py, e))
    }

    /// Cancels the stream if it is still open and forgets it.
    fn close(&self) {
        self.conn.get().core.release(self.id);
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }

    /// Tokens received so far.
    #[getter]
    fn tokens(&self) -> u64 {
        self.conn.get().core.stream_tokens(self.id)
    }

    /// The `cnse.Completion` once the iteration reached the END, else None.
    #[getter]
    fn result(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.result.get(py).map(|c| c.clone_ref(py))
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "<cnse.AsyncStream id={} tokens={}{}>",
            self.id,
            self.tokens(),
            if self.result.get(py).is_some() { " ended" } else { "" }
        )
    }
}

pub(crate) enum AwaitKind {
    /// The handshake: gives (server name, payload limit).
    Ready,
    /// `__anext__` of a stream: gives its next text.
    Next(Py<AsyncStream>),
    /// `generate`: gives the completion; the stream is released after.
    Completion,
    /// `ping`: gives the round trip in seconds; the ping is released after.
    Ping,
}

/// The awaitable behind every async call of the SDK.
#[pyclass(module = "cnse._cnse")]
pub struct Await {
    conn: Py<Connection>,
    key: Key,
    kind: AwaitKind,
    done: bool,
}

impl Await {
    pub(crate) fn new(conn: Py<Connection>, key: Key, kind: AwaitKind) -> Self {
        Await {
            conn,
            key,
            kind,
            done: false,
        }
    }

    fn release(&self) {
        let conn = self.conn.get();
        match (&self.kind, self.key) {
            (AwaitKind::Completion, Key::Stream(id)) => conn.core.release(id),
            (AwaitKind::Ping, Key::Ping(seq)) => conn.core.ping_release(seq),
            _ => {}
        }
    }

    /// The outcome of a ready poll, as `StopIteration(value)` (the await's
    /// value), `StopAsyncIteration` or the error.
    fn finish(&self, py: Python<'_>, got: Result<Value, crate::error::SdkError>) -> PyErr {
        let value = match (&self.kind, got) {
            (_, Err(e)) => return to_py_err(py, e),
            (
                AwaitKind::Ready,
                Ok(Value::Server {
                    name,
                    payload_bytes_max,
                }),
            ) => (name, payload_bytes_max)
                .into_pyobject(py)
                .map(|t| t.into_any().unbind()),
            (AwaitKind::Next(s), Ok(v)) => {
                let s = s.get();
                match next_item(py, s.id, &s.result, Ok(v)) {
                    Ok(Some(text)) => Ok(text),
                    Ok(None) => return PyStopAsyncIteration::new_err(()),
                    Err(e) => Err(e),
                }
            }
            (AwaitKind::Completion, Ok(Value::Completion(facts, text))) => match self.key {
                Key::Stream(id) => completion(py, id, facts, text),
                _ => Err(PyRuntimeError::new_err("completion awaited on a non-stream key")),
            },
            (AwaitKind::Ping, Ok(Value::Rtt(d))) => Ok(PyFloat::new(py, d.as_secs_f64()).into_any().unbind()),
            (_, Ok(_)) => Err(PyRuntimeError::new_err("awaited value of the wrong kind")),
        };
        match value {
            Ok(v) => PyStopIteration::new_err((v,)),
            Err(e) => e,
        }
    }
}

impl Drop for Await {
    fn drop(&mut self) {
        if !self.done {
            // Cancelled or never awaited: nothing will take the answer.
            let conn = self.conn.get();
            conn.forget_future(self.key);
            conn.core.unpark(self.key);
            self.release();
        }
    }
}

#[pymethods]
impl Await {
    #[allow(clippy::self_named_constructors)] // the await protocol: `__await__` returns the iterator itself
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(mut slf: PyRefMut<'_, Self>, py: Python<'_>) -> PyResult<Py<PyAny>> {
        if slf.done {
            return Err(PyRuntimeError::new_err(
                "cannot reuse an already awaited cnse awaitable",
            ));
        }
        if let AwaitKind::Next(s) = &slf.kind {
            if s.get().result.get(py).is_some() {
                slf.done = true;
                return Err(PyStopAsyncIteration::new_err(()));
            }
        }
        let conn = slf.conn.clone_ref(py);
        let c = conn.get();
        match c.core.poll(slf.key, Waiter::Async) {
            Polled::Pending => c.park_future(py, &conn, slf.key),
            Polled::Ready(got) => {
                slf.done = true;
                let err = slf.finish(py, got);
                slf.release();
                Err(err)
            }
        }
    }
}
