"""
A scripted fake downstream SMTP/LMTP server, for testing code that talks to
one (the outbound engine, the relay, your own handlers).

A L{Script} says what the server answers at every step: greeting, EHLO/LHLO
capabilities, MAIL, RCPT (per address), DATA, end-of-data (per recipient
for LMTP), STARTTLS (with real TLS when given server options), AUTH
exchanges.  Any step may instead L{STALL} (never answer), L{CLOSE} (drop
the connection), L{RESET} (abort it) or answer with arbitrary bytes
(garbage, injected extra lines).  In the body, after a given number of
bytes, it may do the same instead of reading on (L{Script.bodyFault}), and
it may read the body slowly (L{Script.readRate}).  L{FakeDownstream}
records exactly what it received.

L{MemoryNetwork} is an endpoint factory for L{smtprelay.relay.failover.Failover}
that connects clients to fakes in memory (L{twisted.test.iosim}), refuses
connections, never completes them or fails to resolve them;
L{connectInMemory} wires one client protocol to one fake.  The client's
transport has a bounded write buffer, as a socket has: when the fake does
not read, the client's producer is paused, and when the connection is
lost, the producer is stopped, as Twisted's own transports do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionLost, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ISSLTransport,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.test import iosim
from zope.interface import directlyProvides, implementer

STALL = b"<stall>"
"""A reply that is never sent: the server just stops answering."""

CLOSE = b"<close>"
"""A reply that is a dropped connection; at the end of a reply, drop the
connection after sending the rest."""

RESET = b"<reset>"
"""Like L{CLOSE}, but the connection is aborted (a TCP reset): what was
not yet delivered is lost."""

DEFAULT_EHLO = (
    b"250-fake.example\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-SIZE 10240000\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)


@attrs.define
class Script:
    """
    What a L{FakeDownstream} answers.  Every reply is raw bytes (CRLF
    included), L{STALL} or L{CLOSE}.

    @ivar replies: by step: C{greeting}, C{EHLO}, C{HELO}, C{LHLO},
        C{STARTTLS}, C{MAIL}, C{RCPT} (default for addresses not in
        L{rcpt}), C{DATA}, C{END} (SMTP end-of-data, and the LMTP default),
        C{RSET}, C{QUIT}, C{NOOP}, C{TLS-EHLO} (EHLO/LHLO after STARTTLS),
        C{XFORWARD}, C{XCLIENT} (answered C{250} and with a new greeting
        by default, as Postfix does; advertise them in C{EHLO}), C{BDAT}
        (each chunk but the last; advertise C{CHUNKING}: the last chunk
        is answered as C{END}), C{*} (anything else).
    @ivar rcpt: RCPT reply by address (without brackets).
    @ivar lmtp: LMTP end-of-data reply by accepted recipient address.
    @ivar auth: the replies to the AUTH command and each following line,
        in order (e.g. C{334}, C{334}, C{235}).
    @ivar tlsOptions: server TLS options; with them a C{220} to STARTTLS
        starts a real TLS handshake.  Without them (in memory) the
        connection only pretends: see L{connectInMemory}.
    @ivar onStep: called with C{(protocol, step)} before a step is
        answered (to count, stall the clock, ...).
    @ivar bodyFault: what happens once L{bodyAfter} bytes of a body were
        read: L{CLOSE}, L{RESET}, L{STALL} (stop reading), or bytes sent
        unrequested (and then stop reading).  L{None}: read on.
    @ivar bodyAfter: see L{bodyFault}.
    @ivar readRate: read a body at most this many bytes per second of the
        connection's clock (L{None}: as fast as it comes).
    """

    replies: dict[str, bytes] = attrs.field(factory=dict)
    rcpt: dict[bytes, bytes] = attrs.field(factory=dict)
    lmtp: dict[bytes, bytes] = attrs.field(factory=dict)
    auth: list[bytes] = attrs.field(factory=list)
    tlsOptions: Any = None
    onStep: Callable[[FakeDownstream, str], None] | None = None
    bodyFault: bytes | None = None
    bodyAfter: int = 0
    readRate: int | None = None

    _DEFAULTS: ClassVar[dict[str, bytes]] = {
        "greeting": b"220 fake.example ESMTP ready\r\n",
        "EHLO": DEFAULT_EHLO,
        "LHLO": DEFAULT_EHLO,
        "HELO": b"250 fake.example\r\n",
        "STARTTLS": b"220 2.0.0 Ready to start TLS\r\n",
        "MAIL": b"250 2.1.0 Ok\r\n",
        "RCPT": b"250 2.1.5 Ok\r\n",
        "DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
        "END": b"250 2.0.0 Ok: queued\r\n",
        "RSET": b"250 2.0.0 Ok\r\n",
        "NOOP": b"250 2.0.0 Ok\r\n",
        "QUIT": b"221 2.0.0 Bye\r\n",
        "XFORWARD": b"250 2.0.0 Ok\r\n",
        "XCLIENT": b"220 fake.example ESMTP ready\r\n",
        "BDAT": b"250 2.0.0 Ok: chunk received\r\n",
        "*": b"502 5.5.2 Error: command not recognized\r\n",
    }

    def reply(self, step: str) -> bytes:
        if step in self.replies:
            return self.replies[step]
        if step == "TLS-EHLO":
            return self.reply("EHLO").replace(b"250-STARTTLS\r\n", b"")
        return self._DEFAULTS.get(step, self._DEFAULTS["*"])


class FakeDownstream(Protocol):
    """
    One connection to the fake server.

    @ivar received: every byte received (after TLS: decrypted), in order.
    @ivar commands: the command lines received (without CRLF), AUTH
        continuation lines included.
    @ivar messages: each DATA body as received (still stuffed), with its
        end-of-data line; each BDAT body as the chunks' bytes together.
    @ivar chunks: the size of each BDAT chunk received, C{-1} after the
        size of a C{LAST} one (e.g. C{[65536, 10, -1]}).
    @ivar recipients: the accepted recipients of the current transaction.
    @ivar lmtp: answer end-of-data once per accepted recipient.
    @ivar tls: STARTTLS has been started on this connection.
    @ivar lost: the connection is gone.
    @ivar transport: an C{iosim.FakeTransport} in memory, a TCP transport
        on loopback: either writes, closes, aborts, starts TLS and says
        whether it is C{disconnecting}, from C{makeConnection} on.
    """

    transport: Any

    def __init__(self, script: Script, lmtp: bool = False, clock: IReactorTime | None = None) -> None:
        self.script = script
        self.lmtp = lmtp
        self.clock = clock or Clock()
        self.received = bytearray()
        self.commands: list[bytes] = []
        self.messages: list[bytes] = []
        self.recipients: list[bytes] = []
        self.chunks: list[int] = []
        self.tls = False
        self.lost = False
        self._buffer = b""
        self._body: bytearray | None = None
        self._chunk = 0
        self._chunkLast = False
        self._chunked = bytearray()
        self._auth: list[bytes] | None = None
        self._lostWaiters: list[Deferred[None]] = []
        self._bodyStart = 0
        self._bodyStartedAt = 0.0
        self._stopped = False

    def connectionMade(self) -> None:
        self._answer("greeting")

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)

    def whenLost(self) -> Deferred[None]:
        """
        A Deferred that fires once the connection is gone.
        """
        if self.lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lostWaiters.append(d)
        return d

    def readable(self) -> int | None:
        """
        How many more bytes this server reads now; L{None}: any number.
        """
        if self.lost or self.transport.disconnecting or self._stopped:
            return 0
        if self._body is None:
            return None
        script = self.script
        limits = []
        if script.bodyFault is not None:
            limits.append(self._bodyStart + script.bodyAfter - len(self.received))
        if script.readRate is not None:
            elapsed = self.clock.seconds() - self._bodyStartedAt
            limits.append(self._bodyStart + int(script.readRate * elapsed) - len(self.received))
        return max(0, min(limits)) if limits else None

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._buffer += data
        script = self.script
        if (
            self._body is not None
            and script.bodyFault is not None
            and len(self.received) - self._bodyStart >= script.bodyAfter
        ):
            self._stopped = True
            self._send(script.bodyFault, "BODY")
            return
        while self._buffer and not self.lost and not self.transport.disconnecting:
            if self._chunk:
                taken, self._buffer = self._buffer[: self._chunk], self._buffer[self._chunk:]
                self._chunked += taken
                self._chunk -= len(taken)
                if not self._chunk:
                    self._chunkReceived()
                continue
            if self._body is not None:
                if not self._bodyReceived():
                    return
                continue
            line, sep, rest = self._buffer.partition(b"\r\n")
            if not sep:
                return
            self._buffer = rest
            self.commands.append(line)
            self._command(line)

    def _bodyReceived(self) -> bool:
        assert self._body is not None
        self._body += self._buffer
        self._buffer = b""
        body = bytes(self._body)
        end = (b"\r\n" + body).find(b"\r\n.\r\n")
        if end < 0:
            return False
        message, self._buffer = body[: end + 3], body[end + 3:]
        self.messages.append(message)
        self._body = None
        self._endOfData()
        return True

    def _chunkReceived(self) -> None:
        if not self._chunkLast:
            self._answer("BDAT")
            return
        self.chunks.append(-1)
        self.messages.append(bytes(self._chunked))
        self._chunked = bytearray()
        self._endOfData()

    def _endOfData(self) -> None:
        if self.lmtp:
            for rcpt in self.recipients:
                answer = self.script.lmtp.get(rcpt, self.script.reply("END"))
                self._send(answer, "END")
                if answer in (STALL, CLOSE, RESET) or answer.endswith((CLOSE, RESET)):
                    break
        else:
            self._answer("END")

    def _command(self, line: bytes) -> None:
        if self._auth is not None:
            self._authStep()
            return
        verb, _, argument = line.partition(b" ")
        step = verb.upper().decode("ascii", "replace")
        if step in ("EHLO", "LHLO") and self.tls:
            self._answer(step, "TLS-EHLO")
        elif step == "MAIL":
            self.recipients = []
            self._answer("MAIL")
        elif step == "RCPT":
            address = argument.partition(b"<")[2].partition(b">")[0]
            answer = self.script.rcpt.get(address, self.script.reply("RCPT"))
            if answer[:1] == b"2":
                self.recipients.append(address)
            self._send(answer, "RCPT")
        elif step == "DATA":
            answer = self.script.reply("DATA")
            if answer[:3] == b"354":
                self._body = bytearray()
                self._bodyStart = len(self.received)
                self._bodyStartedAt = self.clock.seconds()
            self._send(answer, "DATA")
        elif step == "BDAT":
            size, _, last = argument.partition(b" ")
            self._chunk, self._chunkLast = int(size), last.upper() == b"LAST"
            self.chunks.append(self._chunk)
            if not self._chunk:
                self._chunkReceived()
        elif step == "AUTH":
            self._auth = list(self.script.auth)
            self._authStep()
        elif step == "STARTTLS":
            answer = self.script.reply("STARTTLS")
            self._send(answer, "STARTTLS")
            if answer[:3] == b"220":
                self._buffer = b""
                self.tls = True
                if self.script.tlsOptions is not None:
                    self.transport.startTLS(self.script.tlsOptions)
        elif step in ("EHLO", "LHLO", "HELO", "RSET", "NOOP", "QUIT", "XFORWARD", "XCLIENT"):
            self._answer(step)
            if step == "QUIT":
                self.transport.loseConnection()
        else:
            self._answer("*")

    def _authStep(self) -> None:
        assert self._auth is not None
        answer = self._auth.pop(0) if self._auth else b"235 2.7.0 Authentication successful\r\n"
        if not answer.startswith(b"334"):
            self._auth = None
        self._send(answer, "AUTH")

    def _answer(self, step: str, replyStep: str | None = None) -> None:
        self._send(self.script.reply(replyStep or step), step)

    def _send(self, answer: bytes, step: str) -> None:
        if self.script.onStep is not None:
            self.script.onStep(self, step)
        if answer == STALL:
            return
        if answer.endswith(CLOSE):
            self.transport.write(answer[: -len(CLOSE)])
            self.transport.loseConnection()
            return
        if answer.endswith(RESET):
            self.transport.write(answer[: -len(RESET)])
            self.transport.abortConnection()
            return
        self.transport.write(answer)


class DownstreamFactory(ServerFactory):
    """
    Makes L{FakeDownstream}s that follow one script; keeps them in
    L{connections}.

    @param lmtp: answer end-of-data once per accepted recipient.
    @param clock: the time source of L{Script.readRate}.
    @param faulty: how many connections follow C{script}; later ones follow
        a well-behaved L{Script} (so that a fault hits one session only).
    """

    def __init__(
        self,
        script: Script | None = None,
        lmtp: bool = False,
        clock: IReactorTime | None = None,
        faulty: int | None = None,
    ) -> None:
        self.script = script or Script()
        self.lmtp = lmtp
        self.clock = clock
        self.faulty = faulty
        self.connections: list[FakeDownstream] = []

    def buildProtocol(self, addr: Any) -> FakeDownstream:
        script = self.script
        if self.faulty is not None and len(self.connections) >= self.faulty:
            script = Script()
        p = FakeDownstream(script, self.lmtp, self.clock)
        p.factory = self
        self.connections.append(p)
        return p


class _ServerTransport(iosim.FakeTransport):
    """
    The fake's side: an abort loses what was not yet delivered and is a
    reset for the peer.
    """

    reset = False

    def abortConnection(self) -> None:
        self.stream = []
        self.reset = True
        self.disconnecting = True


class PretendTLSTransport(iosim.FakeTransport):
    """
    A client transport whose C{startTLS} pretends: the handshake completes
    at once (C{handshakeCompleted}) or fails with an OpenSSL error, as
    C{handshake} says (C{"ok"} or C{"fail"}).

    Its write buffer is bounded like a socket's: a streaming producer is
    paused while more than L{highWater} bytes wait for the peer and resumed
    once they are read; the peer reads only as much as its C{readable()}
    says (a L{FakeDownstream} reading slowly or not at all).  When the
    connection is lost, the producer is stopped before the protocol hears
    of it, as L{twisted.internet.abstract.FileDescriptor} does.

    @ivar tlsStarted: the options passed to each C{startTLS}.
    """

    highWater = 64 * 1024

    def __init__(self, protocol: IProtocol, handshake: str = "ok", **kw: Any) -> None:
        super().__init__(protocol, isServer=False, **kw)
        self.handshake = handshake
        self.tlsStarted: list[Any] = []
        self.peerProtocol: Any = None
        self.peerTransport: Any = None
        self._producerPaused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if (
            self.producer is not None
            and self.streamingProducer
            and not self._producerPaused
            and sum(map(len, self.stream)) > self.highWater
        ):
            self._producerPaused = True
            self.producer.pauseProducing()

    def getOutBuffer(self) -> Any:
        readable = getattr(self.peerProtocol, "readable", lambda: None)()
        if readable is None or not self.stream:
            data = super().getOutBuffer()
        else:
            waiting = b"".join(self.stream)
            data, rest = waiting[:readable], waiting[readable:]
            self.stream = [rest] if rest else []
        if self._producerPaused and sum(map(len, self.stream)) <= self.highWater // 2:
            self._producerPaused = False
            if self.producer is not None:
                self.producer.resumeProducing()
        return data or None

    def reportDisconnect(self) -> None:
        if getattr(self.peerTransport, "reset", False):
            self.disconnectReason = ConnectionLost("reset by peer")  # type: ignore[assignment]  # iosim.FakeTransport's class default makes it a ConnectionDone; any exception goes
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        super().reportDisconnect()

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        self.tlsStarted.append(contextFactory)
        if self.handshake == "ok":
            directlyProvides(self, ISSLTransport)
            self.protocol.handshakeCompleted()
        else:
            self.disconnectReason = SSL.Error("pretend handshake failure")  # type: ignore[assignment]  # iosim.FakeTransport's class default makes it a ConnectionDone; any exception goes
            self.loseConnection()


def connectInMemory(
    client: IProtocol,
    server: Protocol,
    clock: IReactorTime | None = None,
    peer: tuple[str, int] = ("192.0.2.25", 25),
    handshake: str = "ok",
) -> iosim.IOPump:
    """
    Connect C{client} to C{server} through L{iosim} transports and return
    the (not yet pumped) L{iosim.IOPump}.  The client's transport is a
    L{PretendTLSTransport} (C{handshake}: C{"ok"} or C{"fail"}).
    """
    serverTransport = _ServerTransport(server, isServer=True)
    clientTransport = PretendTLSTransport(
        client, handshake, peerAddress=IPv4Address("TCP", *peer)
    )
    clientTransport.peerProtocol = server
    clientTransport.peerTransport = serverTransport
    return iosim.connect(
        server, serverTransport, client, clientTransport, greet=False, clock=clock or Clock()
    )


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, network: MemoryNetwork, key: str) -> None:
        self._network = network
        self._key = key

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._network._connect(self._key, factory)


class MemoryNetwork:
    """
    An endpoint factory (C{(address, timeout, tlsOptions) → endpoint}) for
    L{smtprelay.relay.failover.Failover} whose addresses lead to fakes in memory.

    Addresses are keyed by C{str(address)} (C{tcp://host:port}).  Unknown
    addresses refuse connections.  Call L{flush} to move bytes.

    @ivar attempts: the address keys connected to, in order.
    @ivar pumps: one per connection made.
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock or Clock()
        self._servers: dict[str, DownstreamFactory] = {}
        self._hang: set[str] = set()
        self._dns: set[str] = set()
        self._handshakes: dict[str, str] = {}
        self.attempts: list[str] = []
        self.pumps: list[iosim.IOPump] = []

    def add(
        self,
        key: str,
        script: Script | None = None,
        lmtp: bool = False,
        handshake: str = "ok",
        faulty: int | None = None,
    ) -> DownstreamFactory:
        """
        A fake server at C{key}; returns its factory (see C{connections}).

        @param handshake: how a STARTTLS handshake ends (C{"ok"}/C{"fail"}).
        @param faulty: only this many connections follow C{script} (see
            L{DownstreamFactory}).
        """
        factory = self._servers[key] = DownstreamFactory(script, lmtp, self.clock, faulty)
        self._handshakes[key] = handshake
        return factory

    def hang(self, key: str) -> None:
        """
        Connections to C{key} never complete (until cancelled).
        """
        self._hang.add(key)

    def recover(self, key: str, script: Script | None = None, lmtp: bool = False) -> DownstreamFactory:
        """
        C{key} works again (connects, resolves), with a fake following
        C{script}; returns its factory.
        """
        self._hang.discard(key)
        self._dns.discard(key)
        return self.add(key, script, lmtp)

    def unresolvable(self, key: str) -> None:
        """
        Connections to C{key} fail with a DNS lookup error.
        """
        self._dns.add(key)

    def __call__(self, address: Any, timeout: float, tlsOptions: Any) -> IStreamClientEndpoint:
        return _MemoryEndpoint(self, str(address))

    def _connect(self, key: str, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.attempts.append(key)
        if key in self._hang:
            return Deferred()
        if key in self._dns:
            return fail(DNSLookupError(key))
        server = self._servers.get(key)
        if server is None:
            return fail(ConnectionRefusedError(key))
        peer = IPv4Address("TCP", "192.0.2.25", 25)
        client = factory.buildProtocol(peer)
        assert client is not None
        self.pumps.append(
            connectInMemory(
                client, server.buildProtocol(peer), self.clock, handshake=self._handshakes[key]
            )
        )
        return succeed(client)

    def flush(self) -> None:
        """
        Move bytes on every connection until nothing moves.
        """
        for _ in range(1000):
            moved = False
            for pump in list(self.pumps):
                moved = pump.flush(advanceClock=False) or moved
            if not moved:
                return
        raise AssertionError("the connections never went quiet")
