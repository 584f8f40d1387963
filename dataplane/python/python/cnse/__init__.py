"""cnse: Python SDK for the CNSE v1 binary protocol of cnse-dp.

    import cnse

    with cnse.Client("127.0.0.1:7070") as client:
        print(client.generate("Write a haiku about the sea.", max_tokens=32))
        for text in client.stream("Once upon a time", max_tokens=64):
            print(text, end="", flush=True)

The protocol work (framing, credit, the socket) runs in Rust (``cnse._cnse``,
PyO3 over the ``cnse-client`` crate): a reader thread per connection fills
per-stream buffers; Python takes text from them. Blocking calls release the
GIL while they wait; :class:`AsyncClient` wakes its asyncio tasks once per
batch of frames. Many streams share one connection. Credit is handled for
you: a stream asks for ``window`` tokens and grants more as you take them,
so a slow reader holds at most ``window`` tokens per stream in memory.

Full reference: ``docs/PYTHON.md`` in the repository.
"""

from __future__ import annotations

from typing import Optional, Union

from ._cnse import STREAMS_MAX, WINDOW_MAX, AsyncStream, Stream
from ._cnse import Connection as _Connection
from ._errors import ClientClosed, ConnectError, ConnectionLost, Error, ProtocolError, ServerError, Timeout
from ._types import Completion, FinishReason

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "Completion",
    "FinishReason",
    "Error",
    "ServerError",
    "ConnectError",
    "ConnectionLost",
    "Timeout",
    "ProtocolError",
    "ClientClosed",
    "WINDOW_DEFAULT",
    "WINDOW_MAX",
    "STREAMS_MAX",
]

WINDOW_DEFAULT = 256
"""Default credit window of a stream, in tokens."""

_MAX_TOKENS_DEFAULT = 64


def _auth_bytes(auth_key: Union[str, bytes, None]) -> Optional[bytes]:
    if auth_key is None or isinstance(auth_key, bytes):
        return auth_key
    if isinstance(auth_key, str):
        return auth_key.encode()
    raise TypeError(f"auth_key must be str, bytes or None, not {type(auth_key).__name__}")


class Client:
    """A blocking client: one connection to a cnse-dp server.

    Args:
        addr: ``"host:port"`` of the server.
        auth_key: the server's auth key (``cnse-dp serve --auth-key-file``),
            sent in HELLO; ``None`` for none. A wrong or missing key raises
            :class:`ServerError` with ``code == 401``.
        window: default credit window of a stream, in tokens (1 to
            ``WINDOW_MAX``): what the server may send ahead of your reading.
        timeout: seconds a waiting call may see nothing from the server
            before :class:`Timeout` is raised (and the stream cancelled);
            ``None`` waits forever.
        connect_timeout: seconds for connecting and the handshake; also
            bounds each write.

    The constructor connects and completes the handshake. The client is
    safe to share between threads; each stream is read by one consumer.
    """

    server: str
    """Server name and version from HELLO_ACK."""
    payload_bytes_max: int
    """The server's payload limit: a prompt may take this less 32 bytes."""

    def __init__(
        self,
        addr: str,
        auth_key: Union[str, bytes, None] = None,
        *,
        window: int = WINDOW_DEFAULT,
        timeout: Optional[float] = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.addr = addr
        self._conn = _Connection(addr, _auth_bytes(auth_key), window, timeout, connect_timeout)
        try:
            self.server, self.payload_bytes_max = self._conn.wait_ready()
        except BaseException:
            self._conn.close()
            raise

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = _MAX_TOKENS_DEFAULT,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        priority: int = 0,
        window: Optional[int] = None,
        session: Optional[str] = None,
    ) -> Completion:
        """Generates to the end and returns the text as a :class:`Completion`.

        ``temperature`` 0 is greedy; ``top_p`` in (0, 1] (1 disables);
        ``top_k`` 0 disables; equal ``seed`` gives equal text; higher
        ``priority`` is scheduled sooner. Out-of-range values raise
        :class:`ServerError` with code 400. ``session``, a key of 1-256
        visible ASCII characters, keeps the requests that carry it on one
        model server (a conversation's turns hit that server's cache; a
        server started with ``--llama-route session``; others ignore it).
        Waits with the GIL released; Ctrl-C cancels the request.
        """
        return self._conn.generate(prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session)

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = _MAX_TOKENS_DEFAULT,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        priority: int = 0,
        window: Optional[int] = None,
        session: Optional[str] = None,
    ) -> Stream:
        """Starts a generation and returns a :class:`Stream` of its text.

        Iterating yields ``str`` pieces as they arrive: each is all the text
        received since the previous one (one or more tokens, never a split
        character). After the loop, ``stream.result`` is the
        :class:`Completion` (END facts included). ``stream.cancel()`` asks
        the server to stop; the loop then ends with reason ``CANCELLED``.
        Leaving the loop early (``break``) and dropping the stream cancels
        it too. Parameters as in :meth:`generate`.
        """
        return self._conn.stream(prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session)

    def ping(self) -> float:
        """Sends PING and returns the round trip to its PONG, in seconds."""
        return self._conn.ping()

    @property
    def closed(self) -> bool:
        """True once the connection has ended (closed, failed or lost)."""
        return self._conn.closed

    def close(self) -> None:
        """Closes the connection; streams still open raise :class:`ClientClosed`."""
        self._conn.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<cnse.Client {self.addr} server={self.server!r}{' closed' if self.closed else ''}>"


class AsyncClient:
    """An asyncio client: one connection to a cnse-dp server.

    Same arguments as :class:`Client`. Connecting starts at once, in the
    background; ``await client.connect()`` (or ``async with``) waits for the
    handshake and raises its errors (401 for a bad key); otherwise the first
    call raises them. Streams opened before the handshake completes are
    sent right after it. Use the client from one event loop; many tasks may
    stream on it at once (one consumer per stream).
    """

    server: Optional[str]
    payload_bytes_max: Optional[int]

    def __init__(
        self,
        addr: str,
        auth_key: Union[str, bytes, None] = None,
        *,
        window: int = WINDOW_DEFAULT,
        timeout: Optional[float] = 60.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.addr = addr
        self.server = None
        self.payload_bytes_max = None
        self._conn = _Connection(addr, _auth_bytes(auth_key), window, timeout, connect_timeout)

    async def connect(self) -> "AsyncClient":
        """Waits for the handshake; returns the client."""
        if self.server is None:
            self.server, self.payload_bytes_max = await self._conn.ready_async()
        return self

    async def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = _MAX_TOKENS_DEFAULT,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        priority: int = 0,
        window: Optional[int] = None,
        session: Optional[str] = None,
    ) -> Completion:
        """Generates to the end; as :meth:`Client.generate`. Cancelling the
        awaiting task cancels the request."""
        return await self._conn.generate_async(prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session)

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int = _MAX_TOKENS_DEFAULT,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        priority: int = 0,
        window: Optional[int] = None,
        session: Optional[str] = None,
    ) -> AsyncStream:
        """Starts a generation and returns an :class:`AsyncStream`
        (``async for text in client.stream(...)``); as :meth:`Client.stream`.
        """
        return self._conn.stream_async(prompt, max_tokens, temperature, top_p, top_k, seed, priority, window, session)

    async def ping(self) -> float:
        """Sends PING and returns the round trip to its PONG, in seconds."""
        return await self._conn.ping_async()

    @property
    def closed(self) -> bool:
        """True once the connection has ended (closed, failed or lost)."""
        return self._conn.closed

    async def close(self) -> None:
        """Closes the connection; streams still open raise :class:`ClientClosed`."""
        self._conn.close()

    async def __aenter__(self) -> "AsyncClient":
        try:
            return await self.connect()
        except BaseException:
            self._conn.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<cnse.AsyncClient {self.addr} server={self.server!r}{' closed' if self.closed else ''}>"

