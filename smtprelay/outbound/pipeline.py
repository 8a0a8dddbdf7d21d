"""
Commands and their replies on one downstream connection.

Every command returns a Deferred that fires with the downstream's L{Reply};
replies are matched to commands first in, first out.  Commands are written
at once when the server offers PIPELINING and one at a time otherwise.
Replies are parsed strictly: garbage, mixed codes, a reply over 64 KiB,
endless continuation lines, a reply nobody asked for (one more than the
commands written before its bytes arrived) or a reply of the wrong class
abort the connection, and every outstanding Deferred fails with
L{DownstreamError}.  Secrets never reach a log line: the protocol trace
(C{debug}) shows AUTH payloads and C{334} challenges as C{****}.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from smtprelay.interfaces import DownstreamError
from smtprelay.net.wire import writeNow
from smtprelay.protocol import replies
from smtprelay.protocol.replies import MalformedReply, Reply

MAX_REPLY_BYTES = 64 * 1024
"""The largest reply (all its lines) we accept from a downstream."""

MAX_REPLY_LINES = 1000
"""The most lines one reply may have."""

Check = Callable[[Reply], bool]
"""Is a reply of the class a command expects?"""


def classes(*allowed: int) -> Check:
    """
    A reply of one of the C{allowed} classes (C{2} for C{2xx}).
    """
    return lambda r: r.code // 100 in allowed


ANY: Check = lambda r: True
NORMAL = classes(2, 4, 5)
DATA: Check = lambda r: r.code == 354 or r.code // 100 in (4, 5)
AUTH: Check = lambda r: r.code == 334 or r.code // 100 in (2, 4, 5)


class CommandPipeline(LineReceiver):
    """
    A FIFO of commands awaiting their replies, with a deadline for each
    (C{timeout} seconds from the last reply, or from writing when nothing
    was awaited).

    @param first: the check of a reply expected before any command (the
        greeting), or None.
    @ivar capabilities: the downstream's EHLO keywords (their PIPELINING
        lets commands go before the earlier ones are answered).
    @ivar peer: the downstream, for logs and reasons.
    @ivar lastVerb: the verb of the last command sent (for logs), or
        C{b""}.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_BYTES
    _log = Logger()

    def __init__(self, clock: IReactorTime, timeout: float, peer: str, debug: bool) -> None:
        self.capabilities: dict[str, str] = {}
        self.peer = peer
        self.lastVerb = b""
        self._clock = clock
        self._timeout = timeout
        self._debug = debug
        self._waiting: deque[tuple[Deferred[Reply], Check]] = deque()
        self._answerable = 0
        self._queued: deque[tuple[bytes, Deferred[Reply], Check, bool]] = deque()
        self._lines: list[bytes] = []
        self._replyBytes = 0
        self._timer: IDelayedCall | None = None
        self._closed = False
        self._error: DownstreamError | None = None

    def connectionMade(self) -> None:
        # Small pipelined commands must not wait for Nagle.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except (OSError, AttributeError):
                pass
        self._armTimer()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self._cancelTimer()
        self._lost(reason)
        self._failAll(self._error or DownstreamError(replies.DOWNSTREAM_LOST, f"connection to {self.peer} lost"))

    def _lost(self, reason: Failure | None) -> None:
        """
        The connection is gone: let go of what waits for it, before its
        outstanding commands fail.
        """

    @property
    def _broken(self) -> DownstreamError | None:
        """
        Why no command can be sent any more, or None.
        """
        if self._closed or self._error is not None:
            return self._error or DownstreamError(replies.DOWNSTREAM_LOST, "connection closed")
        return None

    def _failAll(self, error: DownstreamError) -> None:
        waiting = [d for d, _ in self._waiting] + [q[1] for q in self._queued]
        self._waiting.clear()
        self._queued.clear()
        for d in waiting:
            d.errback(error)

    def _abortWith(self, reply_: Reply, reason: str) -> DownstreamError:
        """
        Close the connection at once; everything outstanding fails with
        C{reply_}.
        """
        if self._error is None:
            self._error = DownstreamError(reply_, reason)
            self._log.info("aborting downstream {peer}: {reason}", peer=self.peer, reason=reason)
            self._cancelTimer()
            self._aborting()
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]  # ITCPTransport, not declared
        return self._error

    def _aborting(self) -> None:
        """
        The connection is being aborted: let go of what waits for it.
        """

    # -- timers -----------------------------------------------------------

    def _armTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._timeout)
        else:
            self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._abortWith(replies.DOWNSTREAM_LOST, f"timeout waiting for {self.peer}")

    # -- replies ----------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # These bytes left the downstream before any command that a reply
        # among them makes us write (the next step, a queued command), so
        # they can answer only the commands already waiting: one more reply
        # is unrequested, however well it would fit the next command.
        self._answerable = len(self._waiting)
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._error is not None:
            return
        if self._debug:
            self._trace("S", b"334 ****" if line[:3] == b"334" else line)
        if not self._lines and not self._answerable:
            self._abortWith(replies.DOWNSTREAM_LOST, f"unrequested reply from {self.peer}")
            return
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._abortWith(replies.DOWNSTREAM_LOST, f"malformed reply from {self.peer}")
            return
        self._lines.append(line)
        self._replyBytes += len(line) + 2
        if len(self._lines) > MAX_REPLY_LINES or self._replyBytes > MAX_REPLY_BYTES:
            self._abortWith(replies.DOWNSTREAM_LOST, f"reply from {self.peer} too long")
            return
        if line[3:4] == b"-":
            return
        lines, self._lines, self._replyBytes = self._lines, [], 0
        try:
            parsed = Reply.fromLines(lines)
        except MalformedReply as e:
            self._abortWith(replies.DOWNSTREAM_LOST, f"malformed reply from {self.peer}: {e}")
            return
        d, check = self._waiting[0]
        if not check(parsed):
            # Fail it with everything behind it, in order, whether the
            # transport reports the loss now or later.
            self._failAll(
                self._abortWith(
                    replies.DOWNSTREAM_CONFUSED, f"unexpected reply {parsed.code} from {self.peer}"
                )
            )
            return
        self._waiting.popleft()
        self._answerable -= 1
        if self._waiting:
            self._armTimer()
        else:
            self._cancelTimer()
        d.callback(parsed)
        self._sendQueued()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abortWith(replies.DOWNSTREAM_LOST, f"reply line from {self.peer} too long")

    # -- commands ---------------------------------------------------------

    def command(self, line: bytes, check: Check = NORMAL, secret: bool = False) -> Deferred[Reply]:
        """
        Send one command line; fire with its reply.  Without PIPELINING the
        line waits until every earlier reply has arrived.

        @param check: is a reply of this class expected?  Any other aborts
            the connection with C{451 4.3.0}.
        @param secret: show the line as C{****} in the protocol trace.
        """
        broken = self._broken
        if broken is not None:
            return fail(broken)
        d: Deferred[Reply] = Deferred()
        if self._waiting and "PIPELINING" not in self.capabilities:
            self._queued.append((line, d, check, secret))
        else:
            self._write(line, d, check, secret)
        return d

    def _expect(self, count: int, check: Check = NORMAL) -> list[Deferred[Reply]]:
        """
        Wait for C{count} replies to what is about to be written.
        """
        waits: list[Deferred[Reply]] = [Deferred() for _ in range(count)]
        if not self._waiting:
            self._armTimer()
        self._waiting.extend((d, check) for d in waits)
        return waits

    def _write(self, line: bytes, d: Deferred[Reply], check: Check, secret: bool) -> None:
        if self._debug:
            self._trace("C", _redactCommand(line) if line[:5].upper() == b"AUTH " else b"****" if secret else line)
        if not secret or line[:5].upper() == b"AUTH ":  # never a 334 answer
            self.lastVerb = line.split(b" ", 1)[0].upper()
        if not self._waiting:
            self._armTimer()
        self._waiting.append((d, check))
        writeNow(self.transport, line + b"\r\n")

    def _sendQueued(self) -> None:
        while self._queued and not self._waiting and self._error is None:
            line, d, check, secret = self._queued.popleft()
            self._write(line, d, check, secret)

    def _trace(self, direction: str, line: bytes) -> None:
        self._log.debug(
            "{peer} {direction}: {line}",
            peer=self.peer,
            direction=direction,
            line=line.decode("utf-8", "replace"),
        )


def _redactCommand(line: bytes) -> bytes:
    if line[:5].upper() == b"AUTH ":
        parts = line.split(b" ")
        return b" ".join(parts[:2] + [b"****"] * (len(parts) > 2))
    return line
