//! `cnse._cnse.Connection`: the Python face of one [`Core`]. The public
//! classes (`cnse.Client`, `cnse.AsyncClient`) are thin Python wrappers
//! over it (`python/cnse/__init__.py`).
//!
//! Blocking calls wait with the GIL released, in slices of [`SLICE`] so
//! that Ctrl-C raises `KeyboardInterrupt`. Async calls return an
//! [`Await`]: ready answers come back without suspending; otherwise it
//! parks an asyncio future that `_on_wake` resolves when the loop sees the
//! core's eventfd readable (one wake-up per batch of frames, however many
//! streams it touched).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use cnse_proto::Params;

use crate::core::{Config, Core, EndFacts, Key, Polled, Value, Waiter, WINDOW_MAX};
use crate::error::SdkError;
use crate::reader;
use crate::streams::{AsyncStream, Await, AwaitKind, Stream};

/// Longest time a blocking call waits with the GIL released before it
/// checks for signals.
const SLICE: Duration = Duration::from_millis(50);

/// Prompts longer than this are sent with the GIL released.
const DETACH_PROMPT_BYTES: usize = 16 << 10;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The exception for `e`: the classes of `cnse/_errors.py`, carrying the
/// protocol code where there is one.
pub(crate) fn to_py_err(py: Python<'_>, e: SdkError) -> PyErr {
    static ERRORS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let (class, code, stream_id) = match &e {
        SdkError::Server { code, stream_id, .. } => ("ServerError", Some(*code), Some(*stream_id)),
        SdkError::Local { code, .. } => ("Error", Some(*code), None),
        SdkError::Connect(_) => ("ConnectError", None, None),
        SdkError::Lost(_) => ("ConnectionLost", None, None),
        SdkError::Timeout(_) => ("Timeout", None, None),
        SdkError::Protocol(_) => ("ProtocolError", None, None),
        SdkError::Closed => ("ClientClosed", None, None),
        SdkError::Usage(m) => return PyValueError::new_err(m.clone()),
    };
    let made = ERRORS
        .get_or_try_init(py, || py.import("cnse._errors").map(Bound::unbind))
        .and_then(|m| m.bind(py).getattr(class))
        .and_then(|c| c.call1((e.to_string(), code, stream_id)));
    match made {
        Ok(exc) => PyErr::from_value(exc),
        Err(err) => err,
    }
}

/// `cnse.Completion(text, reason, tokens, ttft_us, total_us, stream_id, failed_over)`.
pub(crate) fn completion(py: Python<'_>, id: u64, facts: EndFacts, text: String) -> PyResult<Py<PyAny>> {
    static COMPLETION: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let class = COMPLETION.import(py, "cnse._types", "Completion")?;
    let c = class.call1((
        text,
        facts.reason,
        facts.tokens,
        facts.ttft_us,
        facts.total_us,
        id,
        facts.failed_over,
    ))?;
    Ok(c.unbind())
}

/// Waits for `key` with the GIL released (first without, if it is ready).
pub(crate) fn wait_key(py: Python<'_>, core: &Core, key: Key) -> PyResult<Result<Value, SdkError>> {
    if let Polled::Ready(r) = core.poll(key, Waiter::None) {
        return Ok(r);
    }
    loop {
        if let Some(r) = py.detach(|| core.wait(key, SLICE)) {
            return Ok(r);
        }
        if let Err(e) = py.check_signals() {
            core.unpark(key);
            return Err(e);
        }
    }
}

fn seconds(v: f64, what: &str) -> PyResult<Duration> {
    if !(v.is_finite() && v > 0.0 && v < 1e9) {
        return Err(PyValueError::new_err(format!(
            "{what} must be a positive number of seconds, got {v}"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The asyncio side of a connection, touched only on its loop's thread.
#[derive(Default)]
struct Aio {
    event_loop: Mutex<Option<Py<PyAny>>>,
    futures: Mutex<HashMap<Key, Py<PyAny>>>,
    keys: Mutex<Vec<Key>>,
}

/// One connection to a cnse-dp server (see `cnse.Client`).
#[pyclass(module = "cnse._cnse", frozen, weakref)]
pub struct Connection {
    pub(crate) core: Arc<Core>,
    window: u32,
    aio: Aio,
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Stops the reader thread (it holds the other reference).
        self.core.close();
        // An AsyncClient dropped without close(): stop watching the eventfd
        // (the loop holds only a weak reference to this object).
        let bound = self.aio.event_loop.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(l) = bound {
            Python::attach(|py| {
                let l = l.bind(py);
                if let Ok(false) = l.call_method0("is_closed").and_then(|v| v.is_truthy()) {
                    let _ = l.call_method1("remove_reader", (self.core.wake_fd(),));
                }
            });
        }
    }
}

/// The loop's callback for a connection's eventfd: wakes it if it still
/// exists (`functools.partial(_wake, weakref.ref(connection))`).
#[pyfunction]
pub(crate) fn _wake(conn: &Bound<'_, PyAny>) -> PyResult<()> {
    let c = conn.call0()?;
    if !c.is_none() {
        c.call_method0("_on_wake")?;
    }
    Ok(())
}

impl Connection {
    fn params(max_tokens: u32, temperature: f32, top_p: f32, top_k: u32, seed: u64, priority: u32) -> Params {
        Params {
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            priority,
        }
    }

    fn open(
        &self,
        py: Python<'_>,
        params: Params,
        prompt: String,
        session: Option<String>,
        window: Option<u32>,
        collect: bool,
    ) -> PyResult<u64> {
        let window = window.unwrap_or(self.window);
        let core = &self.core;
        // A long prompt's write may wait on the socket: not with the GIL.
        let opened = if prompt.len() > DETACH_PROMPT_BYTES {
            py.detach(|| core.open_stream(params, prompt, session, window, collect))
        } else {
            core.open_stream(params, prompt, session, window, collect)
        };
        opened.map_err(|e| to_py_err(py, e))
    }

    /// The running loop, watching this connection's eventfd from now on
    /// through a weak reference (so that dropping the client closes it).
    fn bind_loop<'py>(&self, py: Python<'py>, this: &Py<Connection>) -> PyResult<Bound<'py, PyAny>> {
        static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static WEAKREF: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static PARTIAL: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        static WAKE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let running = GET_RUNNING_LOOP.import(py, "asyncio", "get_running_loop")?.call0()?;
        let bound = lock(&self.aio.event_loop).as_ref().map(|l| l.clone_ref(py));
        if let Some(l) = bound {
            if l.bind(py).is(&running) {
                return Ok(running);
            }
            if !l.bind(py).call_method0("is_closed")?.is_truthy()? {
                return Err(PyRuntimeError::new_err(
                    "this AsyncClient is used from another event loop than the one it first ran on",
                ));
            }
        }
        let weak = WEAKREF.import(py, "weakref", "ref")?.call1((this.bind(py),))?;
        let wake = WAKE.import(py, "cnse._cnse", "_wake")?;
        let callback = PARTIAL.import(py, "functools", "partial")?.call1((wake, weak))?;
        running.call_method1("add_reader", (self.core.wake_fd(), callback))?;
        let old = lock(&self.aio.event_loop).replace(running.clone().unbind());
        drop(old);
        Ok(running)
    }

    /// Parks an asyncio future for `key` (whose async waiter the core has
    /// just registered) and returns it, ready to be yielded to the task.
    /// Tasks awaiting the same key (several `connect()`) share its future.
    pub(crate) fn park_future(&self, py: Python<'_>, this: &Py<Connection>, key: Key) -> PyResult<Py<PyAny>> {
        let existing = lock(&self.aio.futures).get(&key).map(|f| f.clone_ref(py));
        if let Some(f) = existing {
            if !f.bind(py).call_method0("done")?.is_truthy()? {
                f.bind(py).setattr("_asyncio_future_blocking", true)?;
                return Ok(f);
            }
        }
        let made = self.bind_loop(py, this).and_then(|l| {
            let fut = l.call_method0("create_future")?;
            fut.setattr("_asyncio_future_blocking", true)?;
            Ok(fut.unbind())
        });
        let fut = match made {
            Ok(f) => f,
            Err(e) => {
                self.core.unpark(key);
                return Err(e);
            }
        };
        let old = lock(&self.aio.futures).insert(key, fut.clone_ref(py));
        drop(old);
        Ok(fut)
    }

    /// Forgets the future of `key` (its awaitable was dropped).
    pub(crate) fn forget_future(&self, key: Key) {
        let old = lock(&self.aio.futures).remove(&key);
        drop(old);
    }
}

#[pymethods]
impl Connection {
    #[new]
    #[pyo3(signature = (addr, auth_key, window, timeout, connect_timeout))]
    fn new(
        py: Python<'_>,
        addr: String,
        auth_key: Option<Vec<u8>>,
        window: u32,
        timeout: Option<f64>,
        connect_timeout: f64,
    ) -> PyResult<Self> {
        if window == 0 || window > WINDOW_MAX {
            return Err(PyValueError::new_err(format!(
                "window must be 1..={WINDOW_MAX} tokens, got {window}"
            )));
        }
        let cfg = Config {
            addr,
            auth_key: auth_key.unwrap_or_default(),
            timeout: timeout.map(|t| seconds(t, "timeout")).transpose()?,
            connect_timeout: seconds(connect_timeout, "connect_timeout")?,
        };
        let core = reader::start(cfg).map_err(|e| to_py_err(py, e))?;
        Ok(Connection {
            core,
            window,
            aio: Aio::default(),
        })
    }

    /// Waits for the handshake; returns (server name, payload limit).
    fn wait_ready(&self, py: Python<'_>) -> PyResult<(String, u64)> {
        match wait_key(py, &self.core, Key::Ready)? {
            Ok(Value::Server {
                name,
                payload_bytes_max,
            }) => Ok((name, payload_bytes_max)),
            Ok(_) => Err(PyRuntimeError::new_err("handshake poll gave a stream value")),
            Err(e) => Err(to_py_err(py, e)),
        }
    }

    fn ready_async(slf: &Bound<'_, Self>) -> Await {
        Await::new(slf.clone().unbind(), Key::Ready, AwaitKind::Ready)
    }

    #[pyo3(signature = (prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        slf: &Bound<'_, Self>,
        prompt: String,
        max_tokens: u32,
        temperature: f32,
        top_p: f32,
        top_k: u32,
        seed: u64,
        priority: u32,
        window: Option<u32>,
        session: Option<String>,
    ) -> PyResult<Stream> {
        let py = slf.py();
        let params = Self::params(max_tokens, temperature, top_p, top_k, seed, priority);
        let id = slf.get().open(py, params, prompt, session, window, false)?;
        Ok(Stream::new(slf.clone().unbind(), id))
    }

    #[pyo3(signature = (prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn stream_async(
        slf: &Bound<'_, Self>,
        prompt: String,
        max_tokens: u32,
        temperature: f32,
        top_p: f32,
        top_k: u32,
        seed: u64,
        priority: u32,
        window: Option<u32>,
        session: Option<String>,
    ) -> PyResult<AsyncStream> {
        let py = slf.py();
        let params = Self::params(max_tokens, temperature, top_p, top_k, seed, priority);
        let id = slf.get().open(py, params, prompt, session, window, false)?;
        Ok(AsyncStream::new(slf.clone().unbind(), id))
    }

    /// One generation to its END, waited for with the GIL released.
    #[pyo3(signature = (prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: String,
        max_tokens: u32,
        temperature: f32,
        top_p: f32,
        top_k: u32,
        seed: u64,
        priority: u32,
        window: Option<u32>,
        session: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let params = Self::params(max_tokens, temperature, top_p, top_k, seed, priority);
        let id = self.open(py, params, prompt, session, window, true)?;
        let got = wait_key(py, &self.core, Key::Stream(id));
        // Released whatever happened (a KeyboardInterrupt cancels it).
        self.core.release(id);
        match got? {
            Ok(Value::Completion(facts, text)) => completion(py, id, facts, text),
            Ok(_) => Err(PyRuntimeError::new_err("collecting stream gave a streaming value")),
            Err(e) => Err(to_py_err(py, e)),
        }
    }

    #[pyo3(signature = (prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_async(
        slf: &Bound<'_, Self>,
        prompt: String,
        max_tokens: u32,
        temperature: f32,
        top_p: f32,
        top_k: u32,
        seed: u64,
        priority: u32,
        window: Option<u32>,
        session: Option<String>,
    ) -> PyResult<Await> {
        let py = slf.py();
        let params = Self::params(max_tokens, temperature, top_p, top_k, seed, priority);
        let id = slf.get().open(py, params, prompt, session, window, true)?;
        Ok(Await::new(slf.clone().unbind(), Key::Stream(id), AwaitKind::Completion))
    }

    /// PING round trip in seconds.
    fn ping(&self, py: Python<'_>) -> PyResult<f64> {
        let seq = self.core.ping_start().map_err(|e| to_py_err(py, e))?;
        let got = wait_key(py, &self.core, Key::Ping(seq));
        self.core.ping_release(seq);
        match got? {
            Ok(Value::Rtt(d)) => Ok(d.as_secs_f64()),
            Ok(_) => Err(PyRuntimeError::new_err("ping poll gave a stream value")),
            Err(e) => Err(to_py_err(py, e)),
        }
    }

    fn ping_async(slf: &Bound<'_, Self>) -> PyResult<Await> {
        let py = slf.py();
        let seq = slf.get().core.ping_start().map_err(|e| to_py_err(py, e))?;
        Ok(Await::new(slf.clone().unbind(), Key::Ping(seq), AwaitKind::Ping))
    }

    /// Closes the connection: waiting streams raise `ClientClosed`.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.core.close();
        let bound = lock(&self.aio.event_loop).take();
        if let Some(l) = bound {
            // Resolve the futures the failure woke, then stop watching.
            self._on_wake(py)?;
            let l = l.bind(py);
            if !l.call_method0("is_closed")?.is_truthy()? {
                l.call_method1("remove_reader", (self.core.wake_fd(),))?;
            }
        }
        Ok(())
    }

    /// True once the connection has ended (closed, failed or lost).
    #[getter]
    fn closed(&self) -> bool {
        self.core.is_failed()
    }

    /// Called by the event loop when the eventfd is readable: resolves the
    /// futures of every key the reader woke.
    fn _on_wake(&self, py: Python<'_>) -> PyResult<()> {
        let mut keys = std::mem::take(&mut *lock(&self.aio.keys));
        self.core.take_ready(&mut keys);
        let futures: Vec<Py<PyAny>> = {
            let mut map = lock(&self.aio.futures);
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        *lock(&self.aio.keys) = keys;
        for f in futures {
            let f = f.bind(py);
            if !f.call_method0("done")?.is_truthy()? {
                f.call_method1("set_result", (py.None(),))?;
            }
        }
        Ok(())
    }
}
