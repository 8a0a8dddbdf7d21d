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

from twisted.internet.abstract import FileDescriptor


def writeNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, sent at once when C{transport} is a plain
    (not TLS) reactor socket that is open.

    With nothing queued, the socket takes the bytes directly
    (C{writeSomeData}, the call the reactor itself makes when a socket is
    writable), so the reactor is not even asked to watch for writability;
    what it does not take, and anything written behind a queue, goes
    through C{write()} and C{doWrite()} in the same turn.  Errors and a
    full socket are left to the reactor, which handles them as it always
    does.  Other transports (TLS, test doubles) just buffer.
    """
    if not _plainSocket(transport):
        transport.write(data)
        return
    if not transport.dataBuffer and not getattr(transport, "_tempDataLen", 1):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
    transport.doWrite()


def _plainSocket(transport: Any) -> bool:
    """
    A reactor TCP/unix socket without TLS, open for writing.  The class is
    checked, not attributes: a TLS wrapper (C{TLSMemoryBIOProtocol})
    forwards unknown attributes to the socket beneath it, whose
    C{writeSomeData} would send plaintext.
    """
    return (
        isinstance(transport, FileDescriptor)
        and getattr(transport, "TLS", None) is False
        and bool(transport.connected)
        and not transport.disconnecting
    )
