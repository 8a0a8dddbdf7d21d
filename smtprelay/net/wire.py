"""
Sending now rather than on the next reactor turn.

A Twisted socket transport buffers C{write()} and sends when the reactor
next finds the socket writable: one more turn of the loop (a poll and two
epoll changes) between a reply and the wire, on every relayed step.  A
relay in lock-step with both of its peers pays that twice per command, so
both protocol engines write through L{writeNow}.

Over TLS the wait is longer: Twisted's TLS transport
(C{BufferingTLSTransport}) gathers small writes until the next turn
(C{callLater(0)}), encrypts them then, and hands the records to the socket,
which sends them one turn later still.  L{writeNow} encrypts at once (what
was gathered before and the new bytes as one record) and sends the records
in the same turn.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.protocols.tls import TLSMemoryBIOProtocol, _AggregateSmallWrites


def writeNow(transport: Any, data: bytes) -> None:
    """
    C{transport.write(data)}, sent at once when C{transport} is a reactor
    socket that is open, with or without TLS.

    With nothing queued, a plain socket takes the bytes directly
    (C{writeSomeData}, the call the reactor itself makes when a socket is
    writable), so the reactor is not even asked to watch for writability;
    what it does not take, and anything written behind a queue, goes
    through C{write()} and C{doWrite()} in the same turn.  Over TLS the
    bytes are encrypted now, behind anything written before, and the
    socket beneath is flushed (C{doWrite()}) in the same turn.  Errors and
    a full socket are left to the reactor, which handles them as it always
    does.  Other transports (test doubles) just buffer.
    """
    if _open(transport) and getattr(transport, "TLS", None) is False:
        if not transport.dataBuffer and not transport._tempDataLen:
            sent = transport.writeSomeData(data)
            if isinstance(sent, int):
                if sent == len(data):
                    return
                data = data[sent:]
        transport.write(data)
        transport.doWrite()
        return
    tls = _tlsOverSocket(transport)
    if tls is None:
        transport.write(data)
        return
    protocol, socket = tls
    aggregator = getattr(protocol, "_aggregator", None)
    if not isinstance(aggregator, _AggregateSmallWrites):
        protocol.write(data)  # not Twisted's buffering transport: as it is
    elif aggregator._buffer:
        # Behind earlier writes (a body), as one record with them.
        aggregator.write(data)
        aggregator.flush()
    else:
        TLSMemoryBIOProtocol.write(protocol, data)
    if socket.dataBuffer or socket._tempDataLen:
        socket.doWrite()


def _open(transport: Any) -> bool:
    """
    A reactor TCP/unix socket open for writing.  The class is checked, not
    attributes: a TLS wrapper (C{TLSMemoryBIOProtocol}) forwards unknown
    attributes to the socket beneath it, whose C{writeSomeData} would send
    plaintext.
    """
    return isinstance(transport, FileDescriptor) and bool(transport.connected) and not transport.disconnecting


def _tlsOverSocket(transport: Any) -> tuple[TLSMemoryBIOProtocol, FileDescriptor] | None:
    """
    The TLS layer of C{transport} and the open socket beneath it: a
    C{TLSMemoryBIOProtocol} over a plain socket (implicit TLS: the
    wrapper is the transport), or a socket after C{startTLS} (its
    C{protocol} is the TLS layer, which writes to the socket itself).
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        socket = transport.transport
        if isinstance(socket, FileDescriptor) and _open(socket) and getattr(socket, "TLS", None) is False:
            return transport, socket
        return None
    protocol = getattr(transport, "protocol", None)
    if _open(transport) and getattr(transport, "TLS", None) is True and isinstance(protocol, TLSMemoryBIOProtocol):
        return protocol, transport
    return None
