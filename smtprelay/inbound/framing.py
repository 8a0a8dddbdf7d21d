"""
Input framing and back-pressure of an inbound session, without a socket.

L{InputBuffer} holds what the client sent and not yet used: it yields
command lines (an overlong one is dropped whole, however its bytes
trickle in), body bytes and the exact byte counts of BDAT chunks, and
refuses to grow past L{MAX_INPUT_BUFFER}.  L{Pauses} keeps why the client's
socket is paused, L{Pauser} is one such reason as an C{IPushProducer}, and
L{hasPendingInput} tells whether a client talked before its greeting.
"""

from __future__ import annotations

import re
import socket
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from smtprelay.protocol.replies import Reply

MAX_INPUT_BUFFER = 1024 * 1024
"""Unprocessed input beyond this means the transport ignored a pause: abort."""

_CRLF = b"\r\n"
_BDAT = re.compile(rb"([0-9]{1,15})(?: +(LAST))?", re.IGNORECASE)


class LineTooLong(Exception):
    """
    A command line was longer than allowed; it was dropped, up to its end.
    """


class InputBuffer:
    """
    The client's bytes not yet used.

    @param limit: the most bytes held (see L{feed}).
    @ivar data: the bytes held, to test or measure (an attribute, not a
        method: it is read several times per command); only the methods
        below change it.
    """

    def __init__(self, limit: int = MAX_INPUT_BUFFER) -> None:
        self._limit = limit
        self.data = b""
        self._discarding = False

    def feed(self, data: bytes) -> bool:
        """
        Append C{data}.

        @return: False when more than the limit is now held: the client
            did not stop when its socket was paused.
        """
        self.data = self.data + data if self.data else data
        return len(self.data) <= self._limit

    def nextLine(self, maxLength: int) -> bytes | None:
        """
        Take one command line, without its CRLF.

        @param maxLength: the longest line accepted, CRLF excluded.
        @return: the line, or L{None} when no complete line is held.
        @raise LineTooLong: a line longer than C{maxLength} ended (its
            bytes are gone; the next line is read normally).
        """
        buf = self.data
        end = buf.find(_CRLF)
        if self._discarding:
            if end < 0:
                self.data = self._keepCR(buf)
                return None
            self.data = buf[end + 2:]
            self._discarding = False
            raise LineTooLong()
        if end < 0:
            if len(buf) > maxLength:
                # Dropped as it comes; only a CR that may start the CRLF stays.
                self._discarding = True
                self.data = self._keepCR(buf)
            return None
        self.data = buf[end + 2:]
        if end > maxLength:
            raise LineTooLong()
        return buf[:end]

    @staticmethod
    def _keepCR(buf: bytes) -> bytes:
        return buf[-1:] if buf.endswith(b"\r") else b""

    def take(self, size: int) -> bytes:
        """
        Take at most C{size} bytes (of a BDAT chunk).
        """
        data = self.data[:size]
        self.data = self.data[len(data):]
        return data

    def takeAll(self) -> bytes:
        """
        Take everything held (body bytes for the scanner).
        """
        data, self.data = self.data, b""
        return data

    def unread(self, data: bytes) -> None:
        """
        Put C{data} back in front: bytes after the end of a body.
        """
        self.data = data + self.data

    def clear(self) -> None:
        """
        Forget everything held (plaintext after STARTTLS, a closed session).
        """
        self.data = b""


@attrs.define
class Chunk:
    """
    A BDAT chunk being read (RFC 3030): its bytes are read exactly, whatever
    its reply.

    @ivar left: bytes still to read.
    @ivar refusal: the reply it gets instead of being read into the body.
    """

    size: int
    last: bool
    left: int
    refusal: Reply | None = None

    @classmethod
    def parse(cls, argument: bytes) -> Chunk | None:
        """
        The chunk announced by C{BDAT count [LAST]}, or L{None} if the
        argument is malformed (the count is unknown: nothing can be skipped).
        """
        match = _BDAT.fullmatch(argument)
        if match is None:
            return None
        size = int(match[1])
        return cls(size, match[2] is not None, size)


class Pauses:
    """
    Why the client's socket is paused: a set of reasons.  The transport is
    paused while any reason holds, and resumed when the last one goes.

    @ivar reasons: the reasons that hold, to test (an attribute, not a
        method: it is read several times per command); only L{pause} and
        L{release} change it.
    """

    def __init__(self) -> None:
        self.reasons: set[str] = set()
        self._paused: Any = None

    def besides(self, reason: str) -> bool:
        """
        Whether a reason other than C{reason} holds.
        """
        return bool(self.reasons - {reason})

    def pause(self, reason: str, transport: Any) -> None:
        """
        Pause C{transport} (if it is not yet) for C{reason}.
        """
        if not self.reasons and self._paused is None and transport is not None:
            self._paused = transport
            transport.pauseProducing()
        self.reasons.add(reason)

    def release(self, reason: str) -> bool:
        """
        C{reason} no longer holds.

        @return: True if it held and was the last: the caller may now
            L{resumeTransport}.
        """
        if reason not in self.reasons:
            return False
        self.reasons.discard(reason)
        return not self.reasons

    def resumeTransport(self) -> None:
        """
        Resume the transport L{pause} paused, if any.
        """
        transport, self._paused = self._paused, None
        if transport is not None:
            transport.resumeProducing()


@implementer(IPushProducer)
class Pauser:
    """
    One reason to pause the client socket, as an L{IPushProducer}: the
    transport's write buffer (C{"write"}) or the handler's consumer during a
    body (C{"body"}).

    @param pause: called with C{reason} to pause.
    @param resume: called with C{reason} to resume.
    """

    def __init__(self, pause: Callable[[str], None], resume: Callable[[str], None],
                 reason: str) -> None:
        self._calls: tuple[Callable[[str], None], Callable[[str], None]] | None = (pause, resume)
        self._reason = reason

    def pauseProducing(self) -> None:
        if self._calls is not None:
            self._calls[0](self._reason)

    def resumeProducing(self) -> None:
        if self._calls is not None:
            self._calls[1](self._reason)

    def stopProducing(self) -> None:
        # The consumer is gone for good.  Drop its pause, so that the body is
        # still read to its real end and the client gets its reply then.
        self.detach()

    def detach(self) -> None:
        """
        Resume once more and then ignore this producer's consumer.
        """
        if self._calls is not None:
            (_, resume), self._calls = self._calls, None
            resume(self._reason)


def hasPendingInput(transport: Any) -> bool:
    """
    Whether the client's socket already holds data (it talked before our
    greeting).  Only plain sockets can tell; anything else says no.  Behind
    the PROXY protocol, the bytes after the header count too.
    """
    check = getattr(transport, "hasPendingInput", None)
    if check is not None and check():
        return True
    getHandle = getattr(transport, "getHandle", None)
    if getHandle is None:
        return False
    try:
        handle = getHandle()
    except Exception:
        return False
    if not isinstance(handle, socket.socket) or handle.type != socket.SOCK_STREAM:
        return False
    try:
        return bool(handle.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:
        return False
