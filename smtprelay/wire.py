"""
Sending now rather than on the next reactor turn.

A Twisted socket transport buffers C{write()} and sends when the reactor
next finds the socket writable: one more turn of the loop (a poll and two
epoll changes) between a reply and the wire, on every relayed step.  A
relay in lock-step with both of its peers pays that twice per command, so
both protocol engines write through L{writeNow}.
"""

from __future__ import annotations

from typing import Any


def writeNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, then, when C{transport} is a reactor
    socket (an L{IWriteDescriptor}) that is not closing, send what it
    holds at once.  What the socket does not take stays buffered and goes
    out on the usual writable event, as do errors, which the reactor then
    handles as it always does; other transports (TLS wrappers, test
    doubles) just buffer.
    """
    transport.write(data)
    doWrite = getattr(transport, "doWrite", None)
    if doWrite is not None and transport.connected and not transport.disconnecting:
        doWrite()
