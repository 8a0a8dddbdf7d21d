"""
Tests for L{smtprelay.sink.capture}: the capture sink, in memory and over a real
loopback socket with Python's C{smtplib}.
"""

from __future__ import annotations

import ipaddress
import json
import os
import smtplib
from typing import Any, Generator

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from smtprelay.app.listeners import sessionPolicy
from smtprelay.config.model import Address, Listener, Target
from smtprelay.sink.capture import SinkOptions, makeSinkFactory, makeSinkService, sinkPolicy

from .server_helpers import STRANGER


class CaptureTests(SynchronousTestCase):
    def session(self, lmtp: bool = False, script: dict[str, str] | None = None) -> tuple[object, str]:
        directory = self.mktemp()
        os.makedirs(directory)
        factory = makeSinkFactory(sinkPolicy(lmtp), directory, script, Clock(), hostname="sink.test")
        factory.newSessionId = lambda: "SID"
        from smtprelay.inbound.session import SMTPServerProtocol
        from .server_helpers import FakeTransport

        protocol = SMTPServerProtocol(factory)
        transport = FakeTransport(STRANGER)
        transport.protocol = protocol
        protocol.makeConnection(transport)
        self.protocol, self.transport = protocol, transport
        return transport, directory

    def send(self, data: bytes) -> bytes:
        self.protocol.dataReceived(data)
        out = self.transport.value()
        self.transport.clear()
        return out

    def test_capture(self) -> None:
        _, directory = self.session()
        self.assertEqual(self.send(b""), b"220 sink.test ESMTP smtprelay\r\n")
        self.send(b"EHLO client.test\r\n")
        out = self.send(b"MAIL FROM:<a@example.com> BODY=8BITMIME\r\nRCPT TO:<b@example.net>\r\n"
                        b"RCPT TO:<c@example.net> NOTIFY=NEVER\r\nDATA\r\n")
        self.assertEqual(out, b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                              b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.send(b"Subject: hi\r\n\r\n..dot\r\n.\r\n"),
                         b"250 2.0.0 Ok: queued as SID-1\r\n")
        with open(os.path.join(directory, "SID-1.eml"), "rb") as f:
            self.assertEqual(f.read(), b"Subject: hi\r\n\r\n.dot\r\n")
        with open(os.path.join(directory, "SID-1.json")) as f:
            envelope = json.load(f)
        self.assertEqual(envelope, {
            "id": "SID-1", "mail_from": "a@example.com",
            "rcpt_to": ["b@example.net", "c@example.net"],
            "params": {"mail": {"BODY": "8BITMIME"}, "rcpt": [{}, {"NOTIFY": "NEVER"}]},
            "helo": "client.test", "protocol": "ESMTP", "client": "192.0.2.7",
            "user": None, "tls": None, "size": 21,
        })
        self.assertEqual(sorted(os.listdir(directory)), ["SID-1.eml", "SID-1.json"])

    def test_script(self) -> None:
        _, directory = self.session(script={
            "RCPT:bad@example.net": "550 5.1.1 no such user", "eod": "451 4.3.0 try later",
        })
        self.send(b"EHLO c\r\n")
        out = self.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<bad@example.net>\r\n"
                        b"RCPT TO:<b@example.net>\r\nDATA\r\n")
        self.assertIn(b"550 5.1.1 no such user\r\n", out)
        self.assertEqual(self.send(b"x\r\n.\r\n"), b"451 4.3.0 try later\r\n")
        self.assertEqual(os.listdir(directory), [])

    def test_lmtpPerRecipient(self) -> None:
        _, directory = self.session(lmtp=True, script={"eod:full@example.net": "452 4.2.2 full"})
        self.send(b"LHLO c\r\n")
        self.send(b"MAIL FROM:<>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<full@example.net>\r\nDATA\r\n")
        self.assertEqual(self.send(b"x\r\n.\r\n"),
                         b"250 2.0.0 Ok: queued as SID-1\r\n452 4.2.2 full\r\n")
        self.assertEqual(sorted(os.listdir(directory)), ["SID-1.eml", "SID-1.json"])

    def test_abortedLeavesNothing(self) -> None:
        _, directory = self.session()
        self.send(b"EHLO c\r\n")
        self.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        self.send(b"partial\r\n")
        self.transport.loseConnection()
        self.assertEqual(os.listdir(directory), [])


class PolicyTests(SynchronousTestCase):
    def test_asTheListenerItReplaces(self) -> None:
        """
        The sink's own policy is what a listener relaying from anywhere with
        default limits gave it (the sink used to build such a listener).
        """
        anywhere = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
        for kind in ("smtp", "lmtp"):
            with self.subTest(kind):
                listener = Listener(kind=kind, addresses=(Address("tcp", "127.0.0.1", 2525),),
                                    deliverTo=Target("sink", "smtp", ()), allow=anywhere)
                self.assertEqual(sinkPolicy(kind == "lmtp"), sessionPolicy(listener))


class OptionsTests(SynchronousTestCase):
    def test_parse(self) -> None:
        script = self.mktemp()
        with open(script, "w") as f:
            json.dump({"mail": "451 4.3.0 try later"}, f)
        options = SinkOptions()
        options.parseOptions(["--listen", "tcp://127.0.0.1:2526", "--listen", "unix:///tmp/s.sock",
                              "--dir", "/tmp/x", "--lmtp", "--script", script])
        self.assertEqual(options["listen"], [Address("tcp", "127.0.0.1", 2526),
                                             Address("unix", path="/tmp/s.sock")])
        self.assertTrue(options["lmtp"])
        self.assertEqual(options["scriptData"]["mail"].code, 451)

    def test_errors(self) -> None:
        self.assertRaises(usage.UsageError, SinkOptions().parseOptions, ["--listen", "tcp://x:1"])
        self.assertRaises(usage.UsageError, SinkOptions().parseOptions,
                          ["--listen", "ftp://x:1", "--dir", "d"])
        self.assertRaises(usage.UsageError, SinkOptions().parseOptions,
                          ["--listen", "tls://127.0.0.1:1", "--dir", "d"])


class LoopbackTests(TestCase):
    """
    A real client (smtplib, in a thread) against the sink on a real port.
    """

    @inlineCallbacks
    def test_smtplib(self) -> Generator[Deferred[Any], Any, None]:
        directory = self.mktemp()
        service = makeSinkService([Address("tcp", "127.0.0.1", 0)], directory, reactor=reactor)
        service.startService()
        self.addCleanup(service.stopService)
        endpointService = list(service)[0]
        listening: Deferred[object] = Deferred()

        def started(port: object) -> object:
            listening.callback(port)
            return port

        endpointService._waitingForPort.addCallback(started)
        port = yield listening
        portNumber = port.getHost().port

        def send() -> dict[str, tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", portNumber, timeout=10) as client:
                return client.sendmail(
                    "a@example.com", ["b@example.net", "c@example.net"],
                    b"Subject: loopback\r\n\r\n.leading dot\r\nbody\r\n",
                )

        refused = yield deferToThread(send)
        self.assertEqual(refused, {})
        names = sorted(os.listdir(directory))
        self.assertEqual(len(names), 2)
        eml, envelopeFile = names
        with open(os.path.join(directory, eml), "rb") as f:
            self.assertEqual(f.read(), b"Subject: loopback\r\n\r\n.leading dot\r\nbody\r\n")
        with open(os.path.join(directory, envelopeFile), encoding="utf-8") as text:
            envelope = json.load(text)
        self.assertEqual(envelope["rcpt_to"], ["b@example.net", "c@example.net"])
        self.assertEqual(envelope["mail_from"], "a@example.com")
        self.assertEqual(envelope["client"], "127.0.0.1")
        self.assertEqual(envelope["protocol"], "ESMTP")
