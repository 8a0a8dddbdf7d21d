"""
Helpers for the inbound engine's tests: a listener, a transport that
behaves like a real one for back-pressure and STARTTLS, and a connected
protocol with a L{RecordingHandlerFactory}.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection

from smtprelay.app.listeners import sessionPolicy
from smtprelay.config.model import Address, Listener, Target
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.inbound.policy import SessionPolicy
from smtprelay.inbound.session import SMTPServerProtocol
from smtprelay.testing.handler import RecordingHandler, RecordingHandlerFactory, ScriptEntry

HOST = "mx.example.org"
TOKEN = "tok123"
GREETING = b"220 mx.example.org ESMTP smtprelay tok123\r\n"
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 40000)
STRANGER = IPv4Address("TCP", "192.0.2.7", 40000)
UNIX = UNIXAddress(None)

EHLO_REPLY = (
    b"250-mx.example.org\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 33554432\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-8BITMIME\r\n"
    b"250-DSN\r\n"
    b"250-SMTPUTF8\r\n"
    b"250 CHUNKING\r\n"
)


def makeListener(**kwargs: Any) -> Listener:
    kind = kwargs.pop("kind", "smtp")
    return Listener(
        kind=kind,
        addresses=(Address("tcp", "127.0.0.1", 2525),),
        deliverTo=Target("t", "smtp", (Address("tcp", "127.0.0.1", 2526),)),
        **kwargs,
    )


def makePolicy(**kwargs: Any) -> SessionPolicy:
    """
    The session policy of a listener configured with C{kwargs} (the
    directives' defaults otherwise), as the service builds it.
    """
    return sessionPolicy(makeListener(**kwargs))


class FakeTransport(StringTransportWithDisconnection):
    """
    A string transport that pauses its producer when more than
    C{highWater} bytes are waiting (as a socket whose peer does not read),
    records C{startTLS} and can pretend to be TLS already.
    """

    highWater = 64 * 1024

    def __init__(self, peer: Any) -> None:
        super().__init__(peerAddress=peer)
        self.tlsStarted: list[Any] = []
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)
        if self.producer is not None and len(self.value()) > self.highWater:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """
        The peer reads everything: return it and let the producer go on.
        """
        data = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return data

    def startTLS(self, options: Any) -> None:
        self.tlsStarted.append(options)


class Session:
    """
    One connected server protocol with its transport, clock and handlers.
    """

    def __init__(
        self,
        policy: SessionPolicy | None = None,
        peer: Any = LOOPBACK,
        script: Mapping[str, ScriptEntry] | None = None,
        manual: Collection[str] = (),
        tlsOptions: Any = None,
        factory: SMTPServerFactory | None = None,
        clock: Clock | None = None,
        transport: FakeTransport | None = None,
    ) -> None:
        self.clock = clock or Clock()
        self.handlers = RecordingHandlerFactory(script, manual)
        if factory is None:
            factory = SMTPServerFactory(
                policy or makePolicy(), self.handlers, HOST, self.clock,
                tlsOptions=tlsOptions, greetingToken=TOKEN,
            )
            ids = iter(f"S{i}" for i in range(1, 1000))
            factory.newSessionId = lambda: next(ids)
        else:
            factory.handlerFactory = self.handlers
        self.factory = factory
        self.protocol: SMTPServerProtocol = factory.buildProtocol(peer)
        self.transport = transport or FakeTransport(peer)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    @property
    def handler(self) -> RecordingHandler:
        return self.handlers.last

    def send(self, data: bytes) -> bytes:
        """
        Deliver C{data} in one segment; return what the server wrote since
        the last call.
        """
        self.protocol.dataReceived(data)
        return self.read()

    def sendBytewise(self, data: bytes) -> bytes:
        for i in range(len(data)):
            self.protocol.dataReceived(data[i:i + 1])
        return self.read()

    def read(self) -> bytes:
        data = self.transport.value()
        self.transport.clear()
        return data

    @property
    def closed(self) -> bool:
        return not self.transport.connected
