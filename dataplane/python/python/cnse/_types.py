"""Result types of the cnse SDK."""

from __future__ import annotations

import enum
from typing import Union


class FinishReason(enum.IntEnum):
    """Why a stream ended (the END frame's ``arg``)."""

    LENGTH = 0
    """``max_tokens`` reached."""
    STOP = 1
    """The model stopped on its own."""
    CANCELLED = 2
    """The client cancelled."""


def _reason(value: int) -> Union[FinishReason, int]:
    try:
        return FinishReason(value)
    except ValueError:  # a later protocol version's reason: kept as a number
        return value


class Completion(str):
    """The text of a finished generation, with the END facts as attributes.

    It *is* the text (a ``str``), so it prints, compares and concatenates as
    one; the facts measured by the server ride along:

    - ``reason``: :class:`FinishReason` (``LENGTH``, ``STOP``, ``CANCELLED``)
    - ``tokens``: tokens the server sent on the stream
    - ``ttft_us``: time to first token, µs, from the REQUEST's arrival (0: none)
    - ``total_us``: total time, µs, from the REQUEST's arrival
    - ``stream_id``: the stream's id on its connection
    - ``failed_over``: the server's model server died mid-stream and the
      stream continued on another from its text so far (END's failover
      mark; docs/PROTOCOL.md, "Failover marks")
    """

    reason: Union[FinishReason, int]
    tokens: int
    ttft_us: int
    total_us: int
    stream_id: int
    failed_over: bool

    def __new__(
        cls,
        text: str,
        reason: int,
        tokens: int,
        ttft_us: int,
        total_us: int,
        stream_id: int,
        failed_over: bool = False,
    ) -> "Completion":
        self = super().__new__(cls, text)
        self.reason = _reason(reason)
        self.tokens = tokens
        self.ttft_us = ttft_us
        self.total_us = total_us
        self.stream_id = stream_id
        self.failed_over = failed_over
        return self

    @property
    def text(self) -> str:
        """The text as a plain ``str``."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return (
            f"Completion({str.__repr__(self)}, reason={self.reason!r}, tokens={self.tokens}, "
            f"ttft_us={self.ttft_us}, total_us={self.total_us})"
        )

    def __reduce__(self):
        return (
            Completion,
            (self.text, int(self.reason), self.tokens, self.ttft_us, self.total_us, self.stream_id, self.failed_over),
        )
