"""
The outbound SMTP/LMTP client protocol: one connection to one downstream.

Every command returns a Deferred that fires with the downstream's L{Reply};
replies are matched to commands first in, first out.  Commands are written
at once when the server offers PIPELINING and one at a time otherwise.
Replies are parsed strictly: garbage, mixed codes, a reply over 64 KiB or
endless continuation lines abort the connection, and every outstanding
Deferred fails with L{DownstreamError}.  The body is dot-stuffed by
L{DotStuffer} at every position, whatever the chunking; an aborted body
never gets its end-of-data.  Secrets never reach a log line: the protocol
trace (C{debug}) shows AUTH payloads as C{****}.
"""

from __future__ import annotations

import base64
from collections import deque
from typing import Any, Sequence

from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from . import replies
from .addresses import downconvert
from .body import DotStuffer
from .config.model import Target
from .interfaces import Credentials, DownstreamError, IDownstream, Params, TLSInfo
from .replies import MalformedReply, Reply, reply

MAX_REPLY_BYTES = 64 * 1024
MAX_REPLY_LINES = 1000

_REQUIRETLS_UNAVAILABLE = reply(550, "5.7.30", "REQUIRETLS support required")
_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")


class AttemptFailed(Exception):
    """
    A step before the transaction failed: try the next target.

    @ivar tls: the failure happened in or right after a TLS handshake.
    """

    def __init__(self, reason: str, tls: bool = False, reply: Reply | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tls = tls
        self.reply = reply


def parseCapabilities(ehlo: Reply) -> dict[str, str]:
    """
    EHLO/LHLO reply → upper-cased keyword → its arguments (the first line is
    the server's name, not a capability).
    """
    caps: dict[str, str] = {}
    for line in ehlo.lines[1:]:
        keyword, _, args = line.strip().partition(" ")
        if keyword:
            caps[keyword.upper()] = args.strip()
    return caps


def _formatParams(params: Params) -> bytes:
    return b"".join(
        b" " + key.encode("ascii") + (b"" if value is None else b"=" + value.encode("utf-8"))
        for key, value in params.items()
    )


@implementer(IDownstream, IHandshakeListener, IPushProducer)
class SMTPClientProtocol(LineReceiver):
    """
    One downstream connection.  Made by L{smtprelay.failover.Failover}, which
    drives the steps before the transaction (greeting, EHLO, STARTTLS, AUTH)
    and hands it to the relay as an L{IDownstream}.

    @ivar greeting: fires with the greeting reply.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_BYTES
    _log = Logger()

    def __init__(self, target: Target, clock: IReactorTime, peer: str = "") -> None:
        self.target = target
        self.lmtp = target.protocol == "lmtp"
        self.capabilities: dict[str, str] = {}
        self.tls: TLSInfo | None = None
        self.peer = peer
        self.greeting: Deferred[Reply] = Deferred()
        self._clock = clock
        self._waiting: deque[Deferred[Reply]] = deque()
        self._queued: deque[tuple[bytes, Deferred[Reply]]] = deque()
        self._lines: list[bytes] = []
        self._replyBytes = 0
        self._timer: IDelayedCall | None = None
        self._timeout = target.commandTimeout
        self._handshake: Deferred[None] | None = None
        self._accepted = 0
        self._stuffer: DotStuffer | None = None
        self._producer: IPushProducer | None = None
        self._stalled: IDelayedCall | None = None
        self._closed = False
        self._error: DownstreamError | None = None
        self._waiting.append(self.greeting)

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass
        self._armTimer()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._closed = True
        self._cancelTimer()
        if self._stalled is not None and self._stalled.active():
            self._stalled.cancel()
        error = self._error or DownstreamError(
            replies.DOWNSTREAM_LOST, f"connection to {self.peer} lost: {reason.getErrorMessage() if reason else ''}"
        )
        self._failAll(error)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(AttemptFailed(f"TLS handshake with {self.peer} failed", tls=True))

    def _failAll(self, error: DownstreamError) -> None:
        waiting = list(self._waiting) + [d for _, d in self._queued]
        self._waiting.clear()
        self._queued.clear()
        for d in waiting:
            d.errback(error)

    def _abortWith(self, reply_: Reply, reason: str) -> None:
        self._error = DownstreamError(reply_, reason)
        self._log.info("aborting downstream {peer}: {reason}", peer=self.peer, reason=reason)
        self.transport.abortConnection()  # type: ignore[union-attr]

    # -- timers -----------------------------------------------------------

    def _armTimer(self) -> None:
        self._cancelTimer()
        self._timer = self._clock.callLater(self._timeout, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        self._abortWith(replies.DOWNSTREAM_LOST, f"timeout waiting for {self.peer}")

    # -- replies ----------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.target.debug:
            self._log.debug("{peer} S: {line}", peer=self.peer, line=_redactReply(line, self._lines))
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
        if not self._waiting:
            self._abortWith(replies.DOWNSTREAM_LOST, f"unsolicited reply from {self.peer}")
            return
        d = self._waiting.popleft()
        if self._waiting:
            self._armTimer()
        else:
            self._cancelTimer()
        d.callback(parsed)
        self._sendQueued()

    def lineLengthExceeded(self, line: bytes) -> None:
        self._abortWith(replies.DOWNSTREAM_LOST, f"reply line from {self.peer} too long")

    # -- commands ---------------------------------------------------------

    def command(self, line: bytes, secret: bool = False) -> Deferred[Reply]:
        """
        Send one command line; fire with its reply.  Without PIPELINING the
        line waits until every earlier reply has arrived.
        """
        if self._closed:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "connection closed"))
        d: Deferred[Reply] = Deferred()
        if self._waiting and "PIPELINING" not in self.capabilities:
            self._queued.append((line, d))
        else:
            self._write(line, d, secret)
        return d

    def _write(self, line: bytes, d: Deferred[Reply], secret: bool = False) -> None:
        if self.target.debug:
            shown = _redactCommand(line) if not secret else b"****"
            self._log.debug("{peer} C: {line}", peer=self.peer, line=shown)
        if not self._waiting:
            self._armTimer()
        self._waiting.append(d)
        self.transport.write(line + b"\r\n")  # type: ignore[union-attr]

    def _sendQueued(self) -> None:
        while self._queued and not self._waiting:
            line, d = self._queued.popleft()
            self._write(line, d)

    # -- the steps before the transaction ---------------------------------

    def hello(self, name: str) -> Deferred[Reply]:
        """
        EHLO (falling back to HELO on 500/502) or LHLO; learn capabilities.
        """
        verb = b"LHLO " if self.lmtp else b"EHLO "

        def learned(r: Reply) -> Reply:
            if r.code == 250:
                self.capabilities = parseCapabilities(r)
                return r
            if not self.lmtp and r.code in (500, 502):
                return self.command(b"HELO " + name.encode("ascii")).addCallback(self._helo)
            raise AttemptFailed(f"{verb.strip().decode()} refused by {self.peer}: {r.code} {r.text}", reply=r)

        self.capabilities = {}
        return self.command(verb + name.encode("ascii")).addCallback(learned)

    def _helo(self, r: Reply) -> Reply:
        if r.code != 250:
            raise AttemptFailed(f"HELO refused by {self.peer}: {r.code} {r.text}", reply=r)
        return r

    def startTLS(self, options: Any) -> Deferred[None]:
        """
        STARTTLS, then the handshake.  Bytes that arrive after the 220 and
        before the handshake are an injection attempt: abort.
        """

        def ready(r: Reply) -> Deferred[None]:
            if r.code != 220:
                raise AttemptFailed(f"STARTTLS refused by {self.peer}: {r.code} {r.text}", reply=r)
            if self._lines or self.clearLineBuffer():
                self._abortWith(replies.DOWNSTREAM_LOST, f"data injected after STARTTLS by {self.peer}")
                raise AttemptFailed(f"data injected after STARTTLS by {self.peer}", tls=True)
            self._handshake = Deferred()
            self.capabilities = {}
            self._armTimer()
            self.transport.startTLS(options)  # type: ignore[union-attr]
            return self._handshake

        return self.command(b"STARTTLS").addCallback(ready)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake (STARTTLS or implicit TLS) and its verification
        succeeded.
        """
        self.tls = _tlsInfo(self.transport)
        if self._handshake is not None:
            self._cancelTimer()
            if self._waiting:
                self._armTimer()
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def authenticate(self, mechanism: str, credentials: Credentials | None) -> Deferred[Reply]:
        """
        AUTH PLAIN/LOGIN (with C{credentials}) or EXTERNAL.  Fires with the
        final reply, whatever its code.
        """
        if mechanism == "external":
            return self.command(b"AUTH EXTERNAL =")
        assert credentials is not None
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if mechanism == "plain":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            return self.command(b"AUTH PLAIN " + token, secret=True)

        def step(r: Reply, answer: bytes) -> Reply | Deferred[Reply]:
            if r.code != 334:
                return r
            return self.command(base64.b64encode(answer), secret=True)

        d = self.command(b"AUTH LOGIN")
        d.addCallback(step, user)
        d.addCallback(step, password)
        return d

    # -- IDownstream: the transaction -------------------------------------

    def mail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        caps = self.capabilities
        out: dict[str, str | None] = {}
        utf8 = "SMTPUTF8" in params
        if utf8 and "SMTPUTF8" not in caps:
            converted = downconvert(sender)
            if converted is None:
                return succeed(replies.UTF8_SENDER)
            sender = converted
        self._utf8Down = utf8 and "SMTPUTF8" not in caps
        for key, value in params.items():
            if key == "SIZE":
                if "SIZE" in caps:
                    out[key] = value
            elif key == "BODY":
                if value and value.upper() == "8BITMIME" and "8BITMIME" not in caps:
                    return succeed(replies.CONVERSION_REQUIRED)
                out[key] = value
            elif key == "SMTPUTF8":
                if "SMTPUTF8" in caps:
                    out[key] = value
            elif key in _DSN_MAIL:
                if "DSN" in caps:
                    out[key] = value
            elif key == "REQUIRETLS":
                if self.tls is None or "REQUIRETLS" not in caps:
                    return succeed(_REQUIRETLS_UNAVAILABLE)
                out[key] = value
            elif key == "AUTH":
                if "AUTH" in caps:
                    out[key] = value
            else:
                out[key] = value
        self._accepted = 0
        return self.command(b"MAIL FROM:<" + sender + b">" + _formatParams(out))

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        if getattr(self, "_utf8Down", False) or not recipient.isascii():
            converted = downconvert(recipient) if "SMTPUTF8" not in self.capabilities else recipient
            if converted is None:
                return succeed(replies.UTF8_RECIPIENT)
            recipient = converted
        out = {k: v for k, v in params.items() if k not in _DSN_RCPT or "DSN" in self.capabilities}

        def counted(r: Reply) -> Reply:
            if r.positive:
                self._accepted += 1
            return r

        return self.command(b"RCPT TO:<" + recipient + b">" + _formatParams(out)).addCallback(counted)

    def data(self) -> Deferred[Reply]:
        def started(r: Reply) -> Reply:
            if r.code == 354:
                self._stuffer = DotStuffer()
                self.transport.registerProducer(self, True)  # type: ignore[union-attr]
            elif r.positive:
                self._abortWith(replies.DOWNSTREAM_CONFUSED, f"{r.code} to DATA from {self.peer}")
                raise DownstreamError(replies.DOWNSTREAM_CONFUSED, f"{r.code} to DATA from {self.peer}")
            return r

        return self.command(b"DATA").addCallback(started)

    def write(self, data: bytes) -> None:
        if self._stuffer is None or self._closed:
            return
        self.transport.write(self._stuffer.stuff(data))  # type: ignore[union-attr]

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._producer = producer

    def unregisterProducer(self) -> None:
        self._producer = None

    def endData(self) -> Deferred[Sequence[Reply]]:
        stuffer, self._stuffer = self._stuffer, None
        if stuffer is None or self._closed:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "no body in progress"))
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._resumeStalled()
        self._timeout = self.target.submissionTimeout
        count = max(1, self._accepted) if self.lmtp else 1
        if self.target.debug:
            self._log.debug("{peer} C: <end of data>", peer=self.peer)
        waits: list[Deferred[Reply]] = [Deferred() for _ in range(count)]
        self._armTimer()
        self._waiting.extend(waits)
        self.transport.write(stuffer.end())  # type: ignore[union-attr]

        def collect(results: list[Reply]) -> list[Reply]:
            self._timeout = self.target.commandTimeout
            return results

        return gatherResults(waits, consumeErrors=True).addCallbacks(
            collect, lambda f: f.value.subFailure  # the first DownstreamError
        )

    def rset(self) -> Deferred[Reply]:
        return self.command(b"RSET")

    def quit(self) -> None:
        if self._closed:
            return
        self.command(b"QUIT").addBoth(lambda _: self.transport.loseConnection())  # type: ignore[union-attr]

    def abort(self) -> None:
        if not self._closed:
            self._error = DownstreamError(replies.DOWNSTREAM_LOST, "aborted")
            self.transport.abortConnection()  # type: ignore[union-attr]

    # -- IPushProducer: the downstream socket's back-pressure ---------------

    def pauseProducing(self) -> None:
        """
        The downstream's write buffer is full: pause the client, and give up
        if the body makes no progress for C{data_timeout}.
        """
        if self._producer is not None:
            self._producer.pauseProducing()
        if self._stalled is None or not self._stalled.active():
            self._stalled = self._clock.callLater(self.target.dataTimeout, self._bodyStalled)

    def resumeProducing(self) -> None:
        self._resumeStalled()
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._resumeStalled()

    def _resumeStalled(self) -> None:
        if self._stalled is not None and self._stalled.active():
            self._stalled.cancel()
        self._stalled = None

    def _bodyStalled(self) -> None:
        self._stalled = None
        self._abortWith(replies.DOWNSTREAM_LOST, f"body stalled writing to {self.peer}")


def _tlsInfo(transport: Any) -> TLSInfo:
    try:
        connection = transport.getHandle()
        return TLSInfo(str(connection.get_protocol_version_name()), str(connection.get_cipher_name()))
    except Exception:
        return TLSInfo("unknown", "unknown")


def _redactCommand(line: bytes) -> bytes:
    if line[:5].upper() == b"AUTH ":
        parts = line.split(b" ")
        return b" ".join(parts[:2] + [b"****"] * (len(parts) > 2))
    return line


def _redactReply(line: bytes, previous: list[bytes]) -> bytes:
    if line[:3] == b"334":
        return b"334 ****"
    return line
