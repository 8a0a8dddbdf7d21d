"""
A body sent as BDAT chunks (RFC 3030): no dot-stuffing, a chunk whenever
L{CHUNK_SIZE} bytes are buffered, the rest with C{LAST}.  The client
protocol writes the chunks and collects their replies here; the first
refusal ends the body (RFC 3030 §4).
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from smtprelay.protocol.replies import Reply, reply

CHUNKS_READY = reply(354, None, "End data with <CR><LF>.<CR><LF>")
"""The go-ahead for a body sent as BDAT chunks (the downstream has no
C{DATA} step to answer)."""

CHUNK_SIZE = 64 * 1024
"""The size of a BDAT chunk: the body is sent whenever this much is
buffered, the rest with C{LAST}."""


class Chunks:
    """
    The body of a transaction sent as BDAT chunks.

    @ivar pending: bytes not sent yet (less than L{CHUNK_SIZE}).
    @ivar replies: the replies to the chunks sent, in order (None: the
        connection was lost, which fails the end-of-data).
    @ivar refused: the first chunk's reply that was not positive: nothing
        more is sent (RFC 3030 §4), and it is the transaction's outcome.
    """

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.size = 0
        self.replies: list[Deferred[Reply | None]] = []
        self.refused: Reply | None = None

    def add(self, data: bytes) -> bytes | None:
        """
        Buffer C{data}; a full chunk to send, if there is one now.
        """
        self.pending.append(data)
        self.size += len(data)
        return self.take() if self.size >= CHUNK_SIZE else None

    def take(self) -> bytes:
        data = b"".join(self.pending)
        self.pending, self.size = [], 0
        return data

    def answered(self, r: Reply) -> Reply:
        if not r.positive and self.refused is None:
            self.refused = r
        return r
