"""Type stubs of the native module (Rust, PyO3). Use the public names in
:mod:`cnse`; ``Connection`` is wrapped by :class:`cnse.Client` and
:class:`cnse.AsyncClient`."""

from typing import Any, Awaitable, Generator, Iterator, Optional, Tuple

from ._types import Completion

WINDOW_MAX: int
"""Largest credit window, in tokens."""
STREAMS_MAX: int
"""Streams held per connection (open, or ended and not yet released)."""
PINGS_MAX: int
"""Pings in flight per connection."""

class Stream(Iterator[str]):
    """Text of one request as it arrives (from :meth:`cnse.Client.stream`)."""

    @property
    def id(self) -> int:
        """The stream id on its connection."""
    @property
    def tokens(self) -> int:
        """Tokens received so far."""
    @property
    def result(self) -> Optional[Completion]:
        """The :class:`cnse.Completion` once iteration reached the END, else None."""
    def __iter__(self) -> "Stream": ...
    def __next__(self) -> str:
        """The text received since the previous item; waits with the GIL released."""
    def cancel(self) -> None:
        """Asks the server to stop; iteration goes on to END with reason CANCELLED."""
    def close(self) -> None:
        """Cancels the stream if still open and forgets it."""
    def __enter__(self) -> "Stream": ...
    def __exit__(self, *exc: object) -> None: ...

class AsyncStream:
    """Text of one request as it arrives, for ``async for`` (from
    :meth:`cnse.AsyncClient.stream`)."""

    @property
    def id(self) -> int: ...
    @property
    def tokens(self) -> int: ...
    @property
    def result(self) -> Optional[Completion]: ...
    def __aiter__(self) -> "AsyncStream": ...
    def __anext__(self) -> Awaitable[str]: ...
    def cancel(self) -> None: ...
    def close(self) -> None: ...

class Await(Awaitable[Any]):
    """The awaitable returned by the async calls."""

    def __await__(self) -> Generator[Any, None, Any]: ...
    def __next__(self) -> Any: ...

class Connection:
    def __init__(
        self,
        addr: str,
        auth_key: Optional[bytes],
        window: int,
        timeout: Optional[float],
        connect_timeout: float,
    ) -> None: ...
    @property
    def closed(self) -> bool: ...
    def wait_ready(self) -> Tuple[str, int]: ...
    def ready_async(self) -> Awaitable[Tuple[str, int]]: ...
    def stream(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
        priority: int, window: Optional[int], session: Optional[str] = None,
    ) -> Stream: ...
    def stream_async(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
        priority: int, window: Optional[int], session: Optional[str] = None,
    ) -> AsyncStream: ...
    def generate(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
        priority: int, window: Optional[int], session: Optional[str] = None,
    ) -> Completion: ...
    def generate_async(
        self, prompt: str, max_tokens: int, temperature: float, top_p: float, top_k: int, seed: int,
        priority: int, window: Optional[int], session: Optional[str] = None,
    ) -> Awaitable[Completion]: ...
    def ping(self) -> float: ...
    def ping_async(self) -> Awaitable[float]: ...
    def close(self) -> None: ...
    def _on_wake(self) -> None: ...
