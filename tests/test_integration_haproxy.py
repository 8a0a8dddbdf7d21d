"""
L{smtprelay.inbound.proxyproto} behind a real HAProxy (C{send-proxy} and
C{send-proxy-v2}): the inbound SMTP engine greets only after the header and
sees the real client's address and port.

HAProxy runs in the foreground (C{-db}) on ephemeral loopback ports, is
started and stopped by each test, and the test is skipped without it.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from smtprelay.inbound.proxyproto import ProxyProtocolFactory
from smtprelay.inbound.factory import SMTPServerFactory

from smtprelay.testing.handler import RecordingHandlerFactory

from .procs import HOST, Processes, freePort, need, waitForPort
from .server_helpers import GREETING, TOKEN, makePolicy
from .server_helpers import HOST as RELAY_HOST

reactor: Any = globalReactor

CONFIG = """\
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend v1
    bind {host}:{v1}
    default_backend relay_v1

backend relay_v1
    server relay {host}:{backend} send-proxy

frontend v2
    bind {host}:{v2}
    default_backend relay_v2

backend relay_v2
    server relay {host}:{backend} send-proxy-v2
"""


class Client(Protocol):
    """
    Reads the greeting, says QUIT, and collects everything until closed.
    """

    def __init__(self) -> None:
        self.received = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        first = not self.received
        self.received += data
        if first:
            assert self.transport is not None
            self.transport.write(b"QUIT\r\n")

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        self.done.callback(self.received)


class HAProxyTests(TestCase):
    """
    HAProxy → L{ProxyProtocolFactory} → L{SMTPServerFactory}.
    """

    def setUp(self) -> None:
        need("haproxy")
        self.handlers = RecordingHandlerFactory()
        server = SMTPServerFactory(
            makePolicy(), self.handlers, RELAY_HOST, reactor, greetingToken=TOKEN
        )
        trusted = (ipaddress.ip_network("127.0.0.0/8"),)
        port = reactor.listenTCP(
            0, ProxyProtocolFactory(server, trusted, reactor), interface=HOST
        )
        self.addCleanup(port.stopListening)
        self.ports = {"v1": freePort(), "v2": freePort()}
        processes = Processes(self)
        config = os.path.join(processes.dir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(CONFIG.format(host=HOST, backend=port.getHost().port, **self.ports))
        haproxy = processes.start("haproxy", ["haproxy", "-f", config, "-db"])
        for name in self.ports:
            waitForPort(self.ports[name], haproxy)

    @inlineCallbacks
    def converse(self, frontend: str) -> Any:
        client = Client()
        endpoint = TCP4ClientEndpoint(reactor, HOST, self.ports[frontend], timeout=10)
        yield connectProtocol(endpoint, client)
        transport: Any = client.transport
        clientPort = transport.getHost().port
        received = yield client.done
        self.assertEqual(received, GREETING + b"221 2.0.0 Bye\r\n")
        [handler] = [h for h in self.handlers.handlers if h.session.clientPort == clientPort]
        self.assertEqual(handler.session.clientHost, HOST)

    def test_v1(self) -> Deferred[None]:
        return self.converse("v1")

    def test_v2(self) -> Deferred[None]:
        return self.converse("v2")
