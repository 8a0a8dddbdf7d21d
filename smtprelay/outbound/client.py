"""
The outbound SMTP/LMTP client protocol: one connection to one downstream.

Every command returns a Deferred that fires with the downstream's L{Reply};
replies are matched to commands first in, first out.  Commands are written
at once when the server offers PIPELINING and one at a time otherwise.
Replies are parsed strictly: garbage, mixed codes, a reply over 64 KiB,
endless continuation lines, a reply nobody asked for (one more than the
commands written before its bytes arrived) or a reply of the wrong class
abort the connection, and every outstanding Deferred fails with
L{DownstreamError}.  The body goes as C{BDAT} chunks (RFC 3030, no
dot-stuffing) to a downstream that advertises CHUNKING and PIPELINING,
else after C{DATA}, dot-stuffed by L{DotStuffer} at every position,
whatever the chunking; an aborted body never gets its end-of-data (the
dot, or the C{LAST} chunk).  Secrets never reach a log line: the protocol trace (C{debug})
shows AUTH payloads and C{334} challenges as C{****}.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
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

from smtprelay.protocol import replies
from smtprelay.protocol.addresses import downconvert
from smtprelay.protocol.body import DotStuffer
from smtprelay.outbound.clientinfo import advertised, xforwardCommands
from smtprelay.config.model import Address, Target
from smtprelay.interfaces import ClientSession, Credentials, DownstreamError, IDownstream, Params, TLSInfo
from smtprelay.protocol.replies import MalformedReply, Reply, reply
from smtprelay.net.tls import ClientOptions
from smtprelay.net.tlsinfo import cipherBits
from smtprelay.net.wire import writeNow

MAX_REPLY_BYTES = 64 * 1024
"""The largest reply (all its lines) we accept from a downstream."""

MAX_REPLY_LINES = 1000
"""The most lines one reply may have."""

REQUIRETLS_UNAVAILABLE = reply(550, "5.7.30", "REQUIRETLS support required")
"""MAIL with REQUIRETLS to a downstream that cannot honour it (RFC 8689)."""

CHUNKS_READY = reply(354, None, "End data with <CR><LF>.<CR><LF>")
"""The go-ahead for a body sent as BDAT chunks (the downstream has no
C{DATA} step to answer)."""

CHUNK_SIZE = 64 * 1024
"""The size of a BDAT chunk: the body is sent whenever this much is
buffered, the rest with C{LAST}."""

_DSN_MAIL = ("RET", "ENVID")
_DSN_RCPT = ("NOTIFY", "ORCPT")

Check = Callable[[Reply], bool]


def _classes(*allowed: int) -> Check:
    return lambda r: r.code // 100 in allowed


_ANY: Check = lambda r: True
_NORMAL = _classes(2, 4, 5)
_DATA: Check = lambda r: r.code == 354 or r.code // 100 in (4, 5)
_AUTH: Check = lambda r: r.code == 334 or r.code // 100 in (2, 4, 5)


class AttemptFailed(Exception):
    """
    A step before the transaction failed: the failover tries the next
    target.

    @ivar reason: log-safe description.
    @ivar backoff: the target is unreachable (connect or greeting failed);
        let it rest.
    @ivar noTLS: the target could not give TLS (for C{require_tls}).
    @ivar retryPlain: a TLS handshake failed; with C{attempt_starttls} and
        without C{require_tls} the same target is retried on a new
        connection without STARTTLS.
    @ivar dns: the target's name did not resolve.
    @ivar auth: the relay could not authenticate there with its own
        configuration: its credentials were refused, the mechanism is not
        offered, or no verified TLS carries the password.  A fault of the
        relay's configuration, never the message's: a temporary failure.
    @ivar stage: the step that failed, for logs: C{connect}, C{greeting},
        C{tls} (implicit TLS), C{ehlo}, C{starttls}, C{xclient} or C{auth}.
    """

    def __init__(
        self,
        reason: str,
        *,
        stage: str = "",
        backoff: bool = False,
        noTLS: bool = False,
        retryPlain: bool = False,
        dns: bool = False,
        auth: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage
        self.backoff = backoff
        self.noTLS = noTLS
        self.retryPlain = retryPlain
        self.dns = dns
        self.auth = auth


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


class _Chunks:
    """
    The body of a transaction sent as BDAT chunks.

    @ivar pending: bytes not sent yet (less than L{CHUNK_SIZE}).
    @ivar replies: the replies to the chunks sent, in order.
    @ivar refused: the first chunk's reply that was not positive: nothing
        more is sent (RFC 3030 §4), and it is the transaction's outcome.
    """

    def __init__(self) -> None:
        self.pending: list[bytes] = []
        self.size = 0
        self.replies: list[Deferred[Reply]] = []
        self.refused: Reply | None = None

    def take(self) -> bytes:
        data = b"".join(self.pending)
        self.pending, self.size = [], 0
        return data

    def answered(self, r: Reply) -> Reply:
        if not r.positive and self.refused is None:
            self.refused = r
        return r


@implementer(IPushProducer)
class _Backpressure:
    """
    Registered on the downstream transport while the body is written: when
    its write buffer fills, pause the client's producer; when it does not
    drain for C{data_timeout}, give up.
    """

    def __init__(self, client: SMTPClientProtocol) -> None:
        self._client = client

    def pauseProducing(self) -> None:
        self._client._bodyPaused()

    def resumeProducing(self) -> None:
        self._client._bodyResumed()

    def stopProducing(self) -> None:
        self._client._cancelStall()


@implementer(IDownstream, IHandshakeListener)
class SMTPClientProtocol(LineReceiver):
    """
    One downstream connection.  L{smtprelay.relay.failover.Failover} drives the
    steps before the transaction (L{greeting}, L{hello}, L{startTLS},
    L{authenticate}) and hands it to the relay as an L{IDownstream}.

    @ivar greeting: fires with the greeting reply.
    @ivar tls: the TLS of this connection once its handshake is complete.
    @ivar tlsOptions: the options of this connection's TLS, which judge
        the peer after the handshake (set by L{startTLS}, or before
        connecting for implicit TLS).
    @ivar untrusted: why the TLS peer is not verified, or None.
    @ivar tlsFailed: the connection was lost to a TLS error.
    @ivar address: the endpoint this connection goes to (set by
        L{smtprelay.relay.failover.Failover}).
    @ivar connectedAt: when the connection was opened (C{clock} seconds).
    @ivar lastVerb: the verb of the last command sent (for logs), or
        C{b""}.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = MAX_REPLY_BYTES
    _log = Logger()

    def __init__(self, target: Target, clock: IReactorTime, peer: str = "") -> None:
        self.target = target
        self.lmtp = target.protocol == "lmtp"
        self.capabilities: dict[str, str] = {}
        self.tls: TLSInfo | None = None
        self.tlsOptions: ClientOptions | None = None
        self.untrusted: str | None = None
        self.peer = peer
        self.tlsFailed = False
        self.greeting: Deferred[Reply] = Deferred()
        self.address: Address | None = None
        self.connectedAt = clock.seconds()
        self.lastVerb = b""
        self._clock = clock
        self._debug = target.debug
        self._waiting: deque[tuple[Deferred[Reply], Check]] = deque()
        self._answerable = 0
        self._queued: deque[tuple[bytes, Deferred[Reply], Check, bool]] = deque()
        self._lines: list[bytes] = []
        self._replyBytes = 0
        self._timer: IDelayedCall | None = None
        self._timeout = target.commandTimeout
        self._handshake: Deferred[None] | None = None
        self._accepted = 0
        self._downconvert = False
        self._body: DotStuffer | _Chunks | None = None
        self._producer: IPushProducer | None = None
        self._paused = False
        self._stall: IDelayedCall | None = None
        self._closed = False
        self._error: DownstreamError | None = None
        self._inTransaction = False
        self._waiting.append((self.greeting, _classes(2, 4, 5)))

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        # Small pipelined commands must not wait for Nagle.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except (OSError, AttributeError):
                pass
        self._armTimer()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self._closed = True
        self._cancelTimer()
        self._cancelStall()
        self._releaseProducer()
        if reason is not None and reason.check(SSL.Error):
            self.tlsFailed = True
        error = self._error or DownstreamError(
            replies.DOWNSTREAM_LOST, f"connection to {self.peer} lost"
        )
        self._failAll(error)
        if self._handshake is not None:
            handshake, self._handshake = self._handshake, None
            handshake.errback(
                AttemptFailed(
                    f"TLS handshake with {self.peer} failed",
                    stage="starttls",
                    noTLS=True,
                    retryPlain=True,
                )
            )

    @property
    def idle(self) -> bool:
        """
        Open, between transactions, with nothing outstanding: the
        connection could serve another transaction as it is.
        """
        return not (
            self._closed
            or self._error is not None
            or self._waiting
            or self._queued
            or self._handshake is not None
            or self._body is not None
            or self._inTransaction
        )

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
            self._releaseProducer()
            if self.transport is not None:
                self.transport.abortConnection()  # type: ignore[attr-defined]
        return self._error

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

    def command(self, line: bytes, check: Check = _NORMAL, secret: bool = False) -> Deferred[Reply]:
        """
        Send one command line; fire with its reply.  Without PIPELINING the
        line waits until every earlier reply has arrived.

        @param check: is a reply of this class expected?  Any other aborts
            the connection with C{451 4.3.0}.
        @param secret: show the line as C{****} in the protocol trace.
        """
        if self._closed or self._error is not None:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "connection closed"))
        d: Deferred[Reply] = Deferred()
        if self._waiting and "PIPELINING" not in self.capabilities:
            self._queued.append((line, d, check, secret))
        else:
            self._write(line, d, check, secret)
        return d

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

    # -- the steps before the transaction ---------------------------------

    def hello(self, name: str) -> Deferred[Reply]:
        """
        EHLO (falling back to HELO on 500/502) or LHLO; learn the
        capabilities.  Fires with the final reply, whatever its code.
        """
        verb = b"LHLO " if self.lmtp else b"EHLO "
        encoded = name.encode("ascii")

        def learned(r: Reply) -> Reply | Deferred[Reply]:
            if r.code == 250:
                self.capabilities = parseCapabilities(r)
            elif not self.lmtp and r.code in (500, 502):
                return self.command(b"HELO " + encoded)
            return r

        self.capabilities = {}
        return self.command(verb + encoded).addCallback(learned)

    def startTLS(self, options: ClientOptions) -> Deferred[Reply]:
        """
        STARTTLS, then the handshake.  Fires with the STARTTLS reply: C{220}
        once the handshake succeeded, whether the peer could be verified or
        not (see L{tls}; the capabilities are then forgotten: say EHLO
        again), anything else when the server refused (the connection stays
        usable in plain text).

        Bytes that arrive after the 220 and before the handshake are an
        injection attempt (or a confused server): abort.

        @raise AttemptFailed: the handshake failed or timed out
            (C{retryPlain}), or data was injected.
        """

        def ready(r: Reply) -> Reply | Deferred[Reply]:
            if r.code != 220:
                return r
            if self._lines or self.clearLineBuffer():
                self._abortWith(replies.DOWNSTREAM_LOST, f"data injected after STARTTLS by {self.peer}")
                raise AttemptFailed(
                    f"data injected after STARTTLS by {self.peer}", stage="starttls", noTLS=True
                )
            handshake: Deferred[None] = Deferred()
            self._handshake = handshake
            self.capabilities = {}
            self.tlsOptions = options
            self._armTimer()
            self.transport.startTLS(options)  # type: ignore[union-attr]
            return handshake.addCallback(lambda _: r)

        return self.command(b"STARTTLS").addCallback(ready)

    def handshakeCompleted(self) -> None:
        """
        The TLS handshake (STARTTLS or implicit TLS) succeeded: judge the
        peer (L{tls}, L{untrusted}).
        """
        connection = _sslConnection(self.transport)
        if connection is None or self.tlsOptions is None:
            self.untrusted = "no certificate to check"
            self.tls = TLSInfo("unknown", "unknown")
        else:
            self.untrusted = self.tlsOptions.verify(connection)
            self.tls = TLSInfo(
                str(connection.get_protocol_version_name()),
                str(connection.get_cipher_name()),
                cipherBits(connection),
                verified=self.untrusted is None,
            )
        if self._handshake is not None:
            if not self._waiting:
                self._cancelTimer()
            handshake, self._handshake = self._handshake, None
            handshake.callback(None)

    def authenticate(self, mechanism: str, credentials: Credentials | None) -> Deferred[Reply]:
        """
        AUTH PLAIN (with an initial response), LOGIN (C{credentials}) or
        EXTERNAL.  Fires with the final reply, whatever its code.
        """
        if mechanism == "external":
            return self.command(b"AUTH EXTERNAL =", _AUTH)
        assert credentials is not None
        user = credentials.username.encode("utf-8")
        password = credentials.password.encode("utf-8")
        if mechanism == "plain":
            token = base64.b64encode(b"\0" + user + b"\0" + password)
            return self.command(b"AUTH PLAIN " + token, _AUTH, secret=True)

        def step(r: Reply, answer: bytes) -> Reply | Deferred[Reply]:
            if r.code != 334:
                return r
            return self.command(base64.b64encode(answer), _AUTH, secret=True)

        d = self.command(b"AUTH LOGIN", _AUTH)
        d.addCallback(step, user)
        d.addCallback(step, password)
        return d

    # -- IDownstream: the transaction -------------------------------------

    def mail(self, sender: bytes, params: Params, client: ClientSession | None = None) -> Deferred[Reply]:
        caps = self.capabilities
        out: dict[str, str | None] = {}
        self._accepted = 0
        self._downconvert = "SMTPUTF8" in params and "SMTPUTF8" not in caps
        if self._downconvert:
            converted = downconvert(sender)
            if converted is None:
                return succeed(replies.UTF8_SENDER)
            sender = converted
        dropped = []
        for key, value in params.items():
            if key == "BODY":
                if (value or "").upper() == "8BITMIME" and "8BITMIME" not in caps:
                    return succeed(replies.CONVERSION_REQUIRED)
                out[key] = value
            elif key == "REQUIRETLS":
                if self.tls is None or "REQUIRETLS" not in caps:
                    return succeed(REQUIRETLS_UNAVAILABLE)
                out[key] = value
            elif key in _DSN_MAIL:
                if "DSN" in caps:
                    out[key] = value
                else:
                    dropped.append(key)
            elif key in ("SIZE", "SMTPUTF8", "AUTH"):
                if key in caps:
                    out[key] = value
            else:
                out[key] = value
        if dropped:
            self._log.debug(
                "{peer} does not advertise DSN: dropped {params}", peer=self.peer, params=dropped
            )
        if client is not None and self.target.forwardClientInfo == "xforward":
            self._xforward(client)
        return self.command(b"MAIL FROM:<" + sender + b">" + _formatParams(out)).addCallback(
            self._transactionOpen
        )

    def _xforward(self, client: ClientSession) -> None:
        """
        XFORWARD before MAIL, on every transaction (the downstream forgets
        the attributes at its end, and a reused connection served another
        client before), with the attributes the downstream advertised.  A
        refusal is only logged, as Postfix's C{smtp} does: the message is
        still delivered, under the relay's own identity.
        """

        def answered(r: Reply, line: bytes) -> None:
            if not r.positive:
                self._log.warn(
                    "{peer} said: {reply} (in reply to {command})",
                    peer=self.peer, reply=r.summary, command=line.decode("ascii"),
                )

        for line in xforwardCommands(client, advertised(self.capabilities.get("XFORWARD", ""))):
            # A lost connection fails the MAIL that follows; nothing to add.
            self.command(line).addCallbacks(answered, lambda f: None, (line,))

    def _transactionOpen(self, reply_: Reply) -> Reply:
        self._inTransaction = reply_.positive
        return reply_

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        if self._downconvert or (not recipient.isascii() and "SMTPUTF8" not in self.capabilities):
            converted = downconvert(recipient)
            if converted is None:
                return succeed(replies.UTF8_RECIPIENT)
            recipient = converted
        dsn = "DSN" in self.capabilities
        out = {k: v for k, v in params.items() if dsn or k not in _DSN_RCPT}
        if len(out) != len(params):
            self._log.debug("{peer} does not advertise DSN: dropped NOTIFY/ORCPT", peer=self.peer)

        def counted(r: Reply) -> Reply:
            if r.positive:
                self._accepted += 1
            return r

        line = b"RCPT TO:<" + recipient + b">" + _formatParams(out)
        return self.command(line).addCallback(counted)

    @property
    def chunking(self) -> bool:
        """
        The body goes as BDAT chunks: the downstream advertised CHUNKING,
        and PIPELINING (chunks stream without waiting for each reply), and
        the target's C{chunking} is on.
        """
        caps = self.capabilities
        return self.target.chunking and "CHUNKING" in caps and "PIPELINING" in caps

    def data(self) -> Deferred[Reply]:
        """
        DATA, or nothing when the body goes as BDAT chunks: then a local
        C{354} at once.
        """
        if self.chunking:
            if self._closed or self._error is not None:
                return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "connection closed"))
            self._startBody(_Chunks())
            return succeed(CHUNKS_READY)

        def started(r: Reply) -> Reply:
            if r.code == 354:
                self._startBody(DotStuffer())
            return r

        return self.command(b"DATA", _DATA).addCallback(started)

    def _startBody(self, body: DotStuffer | _Chunks) -> None:
        self._body = body
        self.transport.registerProducer(_Backpressure(self), True)  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        body = self._body
        if body is None or self._error is not None or self._closed:
            return
        if isinstance(body, DotStuffer):
            # Buffered: the end-of-data's writeNow sends the tail in the
            # same segment as the dot; a long body goes out as the socket
            # drains.
            self.transport.write(body.stuff(data))  # type: ignore[union-attr]
            return
        if body.refused is not None:
            return
        body.pending.append(data)
        body.size += len(data)
        if body.size >= CHUNK_SIZE:
            chunk = body.take()
            [answer] = self._expect(1)
            # A lost connection fails the end-of-data; nothing to add here.
            body.replies.append(answer.addCallbacks(body.answered, lambda f: None))
            if self._debug:
                self._trace("C", b"BDAT %d" % len(chunk))
            self.transport.write(b"BDAT %d\r\n" % len(chunk) + chunk)  # type: ignore[union-attr]

    def _expect(self, count: int) -> list[Deferred[Reply]]:
        """
        Wait for C{count} replies to what is about to be written.
        """
        waits: list[Deferred[Reply]] = [Deferred() for _ in range(count)]
        if not self._waiting:
            self._armTimer()
        self._waiting.extend((d, _NORMAL) for d in waits)
        return waits

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        self._producer = producer
        if self._paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None

    def endData(self) -> Deferred[Sequence[Reply]]:
        """
        The dot after DATA; after BDAT chunks, once every chunk was
        accepted, the rest of the body as the C{LAST} chunk (C{BDAT 0
        LAST} when nothing is left).  A refused chunk is the outcome
        without a C{LAST}, and RSET ends the downstream's transaction.
        """
        body, self._body = self._body, None
        if body is None or self._closed or self._error is not None:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "no body in progress"))
        self.transport.unregisterProducer()  # type: ignore[union-attr]
        self._cancelStall()
        self._paused = False
        self._timeout = self.target.submissionTimeout
        if isinstance(body, DotStuffer):
            if self._debug:
                self._trace("C", b"<end of data>")
            return self._final(body.end())

        def chunksAnswered(_: object) -> Sequence[Reply] | Deferred[Sequence[Reply]]:
            if body.refused is None:
                rest = body.take()
                if self._debug:
                    self._trace("C", b"BDAT %d LAST" % len(rest))
                return self._final(b"BDAT %d LAST\r\n" % len(rest) + rest)
            self._timeout = self.target.commandTimeout
            self.rset().addErrback(lambda f: None)
            return [body.refused]

        return gatherResults(body.replies).addCallback(chunksAnswered)

    def _final(self, end: bytes) -> Deferred[Sequence[Reply]]:
        """
        Send C{end} (the dot, or the C{LAST} chunk); fire with its one reply
        (SMTP) or one per accepted recipient (LMTP).
        """
        if self._closed or self._error is not None:
            return fail(self._error or DownstreamError(replies.DOWNSTREAM_LOST, "connection closed"))
        count = max(1, self._accepted) if self.lmtp else 1
        received: list[Reply] = []

        def arrived(r: Reply) -> Reply:
            received.append(r)
            return r

        waits = [d.addCallback(arrived) for d in self._expect(count)]
        self._armTimer()
        writeNow(self.transport, end)

        def collected(results: list[Reply]) -> list[Reply]:
            self._timeout = self.target.commandTimeout
            self._inTransaction = False
            return results

        def firstError(f: Failure) -> Failure:
            f.trap(FirstError)
            error = f.value.subFailure.value
            if received and isinstance(error, DownstreamError):
                # Replies come in RCPT order: those before the failure are
                # verdicts the client must get (not to be delivered twice).
                raise DownstreamError(error.reply, error.reason, received)
            return f.value.subFailure  # type: ignore[no-any-return]

        return gatherResults(waits, consumeErrors=True).addCallbacks(collected, firstError)

    def rset(self) -> Deferred[Reply]:
        self._body = None

        def reset(r: Reply) -> Reply:
            if r.positive:
                self._inTransaction = False
            return r

        return self.command(b"RSET").addCallback(reset)

    def quit(self) -> None:
        if self._closed or self._error is not None:
            return
        transport = self.transport

        def close(_: object) -> None:
            if transport is not None:
                transport.loseConnection()

        self.command(b"QUIT", _ANY).addBoth(close)

    def abort(self) -> None:
        if not self._closed:
            self._abortWith(replies.DOWNSTREAM_LOST, "aborted")

    # -- back-pressure ------------------------------------------------------

    def _releaseProducer(self) -> None:
        """
        The body can no longer reach the downstream: stop holding the
        client's upload (a dead downstream must not hold it), which is then read to its end-of-data
        and discarded here; the end-of-data gets the failure.
        """
        producer, self._producer = self._producer, None
        self._paused = False
        if producer is not None:
            producer.stopProducing()

    def _bodyPaused(self) -> None:
        self._paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if self._stall is None or not self._stall.active():
            self._stall = self._clock.callLater(self.target.dataTimeout, self._bodyStalled)

    def _bodyResumed(self) -> None:
        self._paused = False
        self._cancelStall()
        if self._producer is not None:
            self._producer.resumeProducing()

    def _cancelStall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _bodyStalled(self) -> None:
        self._stall = None
        self._abortWith(replies.DOWNSTREAM_LOST, f"body stalled writing to {self.peer}")


def _sslConnection(transport: Any) -> SSL.Connection | None:
    """
    The OpenSSL connection of a TLS transport (implicit TLS wraps the
    transport; STARTTLS puts the TLS protocol inside it).
    """
    for candidate in (transport, getattr(transport, "protocol", None)):
        getHandle = getattr(candidate, "getHandle", None)
        connection = getHandle() if getHandle is not None else None
        if isinstance(connection, SSL.Connection):
            return connection
    return None


def _redactCommand(line: bytes) -> bytes:
    if line[:5].upper() == b"AUTH ":
        parts = line.split(b" ")
        return b" ".join(parts[:2] + [b"****"] * (len(parts) > 2))
    return line
