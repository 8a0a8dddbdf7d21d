"""
The whole relay in memory for the reliability suite: client connections →
the inbound engine → the relay session → failover and the outbound engine →
scripted fake downstreams (L{smtprelay.testing.downstream}), all on one
L{Clock}.  L{Client.exchange} sends bytes and lets fake time run until the
replies it waits for arrived, or a deadline passed: a hang is a missing
reply, never a slow test.  L{RelayStack.assertQuiet} checks that nothing
was leaked: no open connection, no pending timer.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app.tls import clientOptions
from smtprelay.config.model import Address, ClientTLS, DownstreamAuth, Listener, Secret, Target
from smtprelay.app.targets import makeFailover, targetRoute
from smtprelay.relay.session import RelaySession
from smtprelay.relay.routing import Router
from smtprelay.app.listeners import sessionPolicy
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.testing.downstream import DEFAULT_EHLO, DownstreamFactory, MemoryNetwork, Script

from .server_helpers import LOOPBACK, FakeTransport

FIRST = Address("tcp", "mx1.example", 25)
SECOND = Address("tcp", "mx2.example", 25)

TLS_EHLO = DEFAULT_EHLO.replace(b"250 ENHANCED", b"250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 ENHANCED")
"""Capabilities of a downstream that offers STARTTLS and AUTH."""

# Target timeouts, shorter than the listener's so that a downstream fault
# must be answered before the client's own timeouts could hide a hang.
CONNECT_TIMEOUT = 20.0
COMMAND_TIMEOUT = 30.0
DATA_TIMEOUT = 40.0
SUBMISSION_TIMEOUT = 60.0
READ_TIMEOUT = 300.0
LISTENER_DATA_TIMEOUT = 600.0
PATIENCE = 250.0
"""Fake seconds a client waits for a reply: longer than every target
timeout, shorter than every listener timeout."""


def finalReplies(data: bytes) -> list[bytes]:
    """
    The final lines (C{NNN text}) of the replies in C{data}, in order.
    """
    return [line for line in data.split(b"\r\n") if line[3:4] == b" "]


class Client:
    """
    One client connection to the relay.

    @ivar output: everything the relay sent to this client.
    """

    def __init__(self, stack: RelayStack, peer: Any = LOOPBACK) -> None:
        self.stack = stack
        self.protocol = stack.factory.buildProtocol(peer)
        self.transport = FakeTransport(peer)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.output = b""
        self._seen = 0
        self._collect()

    def _collect(self) -> None:
        self.output += self.transport.value()
        self.transport.clear()

    @property
    def closed(self) -> bool:
        return not self.transport.connected

    def exchange(self, data: bytes, count: int = 1) -> list[bytes]:
        """
        Send C{data}; run fake time until C{count} more final replies came
        (or the connection closed, or L{PATIENCE} passed); return the new
        final reply lines.
        """
        if data and not self.closed:
            self.protocol.dataReceived(data)
        deadline = self.stack.clock.seconds() + PATIENCE
        while True:
            self.stack.flush()
            self._collect()
            new = finalReplies(self.output)[self._seen:]
            if len(new) >= count or self.closed:
                break
            if not self.stack.advanceTowards(deadline):
                break
        self._seen += len(new)
        return new

    def disconnect(self, reason: Failure) -> None:
        """
        The client's connection ends: C{ConnectionDone} for a FIN (or a TLS
        close), C{ConnectionLost} for a reset.
        """
        self.transport.connected = False
        self.protocol.connectionLost(reason)
        self.stack.flush()


class RelayStack:
    """
    A listener relaying to one target whose endpoints are fakes.

    @param protocol: C{"smtp"} (SMTP listener, SMTP target), C{"lmtp"}
        (LMTP both sides) or C{"smtp-lmtp"} (SMTP listener, LMTP target).
    @param scripts: the fake at each endpoint (L{None}: refuses).
    @param faulty: how many connections to each fake follow its script
        (later ones behave).
    @param listenerOptions: L{Listener} fields (limits, timeouts).
    @param targetOptions: L{Target} fields; C{withAuth=True} configures
        AUTH PLAIN with the relay's own credentials (and STARTTLS, without
        certificate verification).
    """

    def __init__(
        self,
        case: SynchronousTestCase,
        scripts: dict[Address, Script | None],
        protocol: str = "smtp",
        endpoints: Sequence[Address] = (FIRST,),
        faulty: int | None = None,
        listenerOptions: dict[str, Any] | None = None,
        **targetOptions: Any,
    ) -> None:
        self.case = case
        self.clock = Clock()
        self.network = MemoryNetwork(self.clock)
        lmtpTarget = protocol in ("lmtp", "smtp-lmtp")
        self.servers: dict[Address, DownstreamFactory] = {
            a: self.network.add(str(a), s, lmtp=lmtpTarget, faulty=faulty)
            for a, s in scripts.items() if s is not None
        }
        options: dict[str, Any] = dict(
            hostname="relay.test", attemptStartTLS=False, connectTimeout=CONNECT_TIMEOUT,
            commandTimeout=COMMAND_TIMEOUT, dataTimeout=DATA_TIMEOUT,
            submissionTimeout=SUBMISSION_TIMEOUT,
        )
        options.update(targetOptions)
        if options.pop("withAuth", False):
            # In memory, TLS only pretends and has no certificate to verify.
            options.update(auth=DownstreamAuth("plain", "relay", Secret("secret")), attemptStartTLS=True,
                           tlsClient=ClientTLS(insecureSkipVerify=True))
        self.target = Target(name="t", protocol="lmtp" if lmtpTarget else "smtp",
                             endpoints=tuple(endpoints), **options)
        self.listener = Listener(
            kind="lmtp" if protocol == "lmtp" else "smtp",
            addresses=(Address("tcp", "127.0.0.1", 2525),), deliverTo=self.target,
            **{"readTimeout": READ_TIMEOUT, "dataTimeout": LISTENER_DATA_TIMEOUT,
               **(listenerOptions or {})},
        )
        self.failover = makeFailover(self.target, self.clock, endpointFactory=self.network)
        routes = Router.single(targetRoute(self.target, self.failover.open, self.failover.release))
        self.factory = SMTPServerFactory(
            sessionPolicy(self.listener),
            lambda session: RelaySession(session, self.listener.auth.mode, routes, "relay.test", self.clock),
            "relay.test", self.clock,
        )
        ids = iter(range(1, 1_000_000))
        self.factory.newSessionId = lambda: f"S{next(ids)}"

    @property
    def hello(self) -> bytes:
        return b"LHLO client.test\r\n" if self.listener.lmtp else b"EHLO client.test\r\n"

    def connect(self) -> Client:
        """
        A new client session, greeted and past EHLO/LHLO.
        """
        client = Client(self)
        self.case.assertEqual([r[:4] for r in client.exchange(self.hello)], [b"220 ", b"250 "])
        return client

    def flush(self) -> None:
        """
        Move bytes and run what is due now until nothing moves.
        """
        for _ in range(100):
            self.network.flush()
            now = self.clock.seconds()
            if not [c for c in self.clock.getDelayedCalls() if c.getTime() <= now]:
                return
            self.clock.advance(0)

    def _waiting(self) -> bool:
        """
        Bytes wait for a fake that reads slowly (or not at all).
        """
        return any(pump.clientIO.stream for pump in self.network.pumps)

    def advanceTowards(self, deadline: float) -> bool:
        """
        Advance fake time to the next timer, to the next second while a fake
        reads slowly, or else to C{deadline}.

        @return: False once C{deadline} is reached.
        """
        now = self.clock.seconds()
        if now >= deadline:
            return False
        steps = [deadline] + [c.getTime() for c in self.clock.getDelayedCalls()]
        if self._waiting():
            steps.append(now + 1)
        self.clock.advance(max(min(steps), now + 0.001) - now)
        return True

    def downstreams(self, address: Address = FIRST) -> list[Any]:
        server = self.servers.get(address)
        return server.connections if server is not None else []

    def allDownstreams(self) -> list[Any]:
        return [c for server in self.servers.values() for c in server.connections]

    def assertQuiet(self) -> None:
        """
        After every client left: no downstream connection open, no timer
        pending (once the connection cache's idle time is over).
        """
        self.clock.advance(self.target.reuseIdleTime + 1)
        self.flush()
        self.clock.advance(0)
        self.case.assertEqual(
            [d.commands for d in self.allDownstreams() if not d.lost], [], "downstream left open"
        )
        self.case.assertEqual(self.factory.sessions, set(), "client session left open")
        self.case.assertEqual(self.clock.getDelayedCalls(), [], "timer leaked")
