"""Exceptions of the cnse SDK.

Every exception is a :class:`cnse.Error`. ``code`` is the protocol's error
code (``docs/PROTOCOL.md``: 400, 401, 404, 409, 413, 429, 500, 502, 503, 504)
when there is one, else ``None``; ``stream_id`` names the stream the server
answered on (0: the connection).
"""

from __future__ import annotations

from typing import Optional


class Error(Exception):
    """Base of every cnse exception.

    Raised as such (with ``code`` set) when the client itself refuses a call
    with the code the server would have given: 413 for a prompt over the
    server's payload limit, 429 for too many streams or pings in flight.
    """

    code: Optional[int]
    stream_id: Optional[int]

    def __init__(self, message: str, code: Optional[int] = None, stream_id: Optional[int] = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.stream_id = stream_id

    def __reduce__(self):  # picklable with its fields
        return (type(self), (self.message, self.code, self.stream_id))


class ServerError(Error):
    """The server answered ERROR ``code`` on a stream (or on stream 0)."""

    code: int


class ConnectError(Error, ConnectionError):
    """Connecting or the handshake failed (refused, unreachable, too slow)."""


class ConnectionLost(Error, ConnectionError):
    """The connection broke: the server closed or reset it, a write failed."""


class Timeout(Error, TimeoutError):
    """Nothing arrived for a waiting stream or ping within ``timeout``."""


class ProtocolError(Error):
    """The server sent a frame the protocol does not allow."""


class ClientClosed(Error):
    """The client was closed; its streams cannot go on."""
