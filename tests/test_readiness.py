"""
Tests for L{smtprelay.app.readiness}: probes of every target on a fake clock
against the scripted fakes of L{smtprelay.testing.downstream}, and what
C{/readyz} answers from them.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Literal

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.app.tls import clientOptions
from smtprelay.config.model import (
    Address, ClientTLS, Destinations, DownstreamAuth, Listener, Reject, Routing, Secret, Target,
)
from smtprelay.app.targets import makeFailover
from smtprelay.relay.failover import Failover
from smtprelay.observe.metrics import Metrics
from smtprelay.app.readiness import Prober
from smtprelay.testing.downstream import CLOSE, STALL, MemoryNetwork, Script

from .logcapture import captureEvents
from .test_metrics import value

MX1 = Address("tcp", "mx1.example", 25)
MX2 = Address("tcp", "mx2.example", 25)
LISTEN = Address("tcp", "127.0.0.1", 2525)
TLS_EHLO = b"250-fake.example\r\n250-PIPELINING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"
TOKEN = "3f9a1c"


def makeTarget(*endpoints: Address, name: str = "smarthost", **kw: Any) -> Target:
    kw.setdefault("protocol", "smtp")
    kw.setdefault("attemptStartTLS", False)
    # In memory TLS is pretended: no certificate to verify unless a test
    # wants the peer judged unverified.
    kw.setdefault("tlsClient", ClientTLS(insecureSkipVerify=True))
    return Target(name=name, endpoints=endpoints or (MX1,), hostname="relay.example", **kw)


def listenerFor(
    delivery: Target | Routing, kind: Literal["smtp", "submission", "lmtp"] = "smtp", address: Address = LISTEN,
) -> Listener:
    return Listener(kind=kind, addresses=(address,), deliverTo=delivery)


class ProberTestCase(SynchronousTestCase):
    interval = 30.0

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.net = MemoryNetwork(self.clock)
        self.metrics = Metrics()
        self.events = captureEvents(self)

    def prober(self, *listeners: Listener) -> Prober:
        """
        A started prober of C{listeners}; bytes moved, stopped in cleanup.
        """
        failovers: dict[int, Failover] = {}

        def failoverFor(target: Target) -> Failover:
            return failovers.setdefault(
                id(target),
                makeFailover(target, reactor=None, loopToken=TOKEN, clock=self.clock, endpointFactory=self.net),
            )

        prober = Prober(listeners, failoverFor, self.clock, self.interval, self.metrics)
        prober.startService()
        self.addCleanup(self.stopped, prober)
        self.net.flush()
        return prober

    def stopped(self, prober: Prober) -> None:
        prober.stopService()
        self.net.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [], "a timer was left behind")

    def tick(self, seconds: float | None = None) -> None:
        self.clock.advance(self.interval if seconds is None else seconds)
        self.net.flush()

    def commands(self, key: Address) -> list[list[bytes]]:
        """
        The commands each connection to C{key} received.
        """
        return [c.commands for c in self.net._servers[str(key)].connections]

    def logged(self, level: LogLevel | None = None) -> list[str]:
        return [
            formatEvent(e) for e in self.events
            if e.get("log_namespace") == "smtprelay.app.readiness.Prober"
            and (level is None or e["log_level"] is level)
        ]


class ScheduleTests(ProberTestCase):
    def test_atStartThenEveryInterval(self) -> None:
        """
        The first probe goes out at start, the next ones every
        C{probe_interval}; none in between.
        """
        self.net.add(str(MX1))
        self.prober(listenerFor(makeTarget()))
        self.assertEqual(self.net.attempts, [str(MX1)])
        self.tick(self.interval - 0.1)
        self.assertEqual(self.net.attempts, [str(MX1)])
        self.tick(0.1)
        self.assertEqual(self.net.attempts, [str(MX1)] * 2)
        self.tick()
        self.assertEqual(self.net.attempts, [str(MX1)] * 3)

    def test_neverMail(self) -> None:
        """
        A probe stops before MAIL: EHLO, STARTTLS, EHLO, AUTH, then QUIT, and
        the connection is closed.
        """
        script = Script(replies={"EHLO": TLS_EHLO}, auth=[b"235 2.7.0 ok\r\n"])
        self.net.add(str(MX1), script)
        target = makeTarget(auth=DownstreamAuth("plain", "relay", Secret("s3cret")))
        prober = self.prober(listenerFor(target))
        self.tick()
        self.assertTrue(prober.ready())
        for commands in self.commands(MX1):
            self.assertEqual(
                [c.split(b" ")[0] for c in commands], [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH", b"QUIT"]
            )
        self.assertTrue(all(c.lost for c in self.net._servers[str(MX1)].connections))
        self.assertNotIn(b"MAIL", b"".join(bytes(c.received) for c in self.net._servers[str(MX1)].connections))

    def test_lmtpSaysLHLO(self) -> None:
        self.net.add(str(MX1), lmtp=True)
        prober = self.prober(listenerFor(makeTarget(protocol="lmtp"), kind="lmtp"))
        self.assertTrue(prober.ready())
        self.assertEqual(self.commands(MX1), [[b"LHLO relay.example", b"QUIT"]])

    def test_stopCancels(self) -> None:
        """
        Stopping the service cancels a probe in flight and the schedule;
        nothing more is probed.
        """
        self.net.hang(str(MX1))
        prober = self.prober(listenerFor(makeTarget()))
        prober.stopService()
        self.tick()
        self.assertEqual(self.net.attempts, [str(MX1)])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FailureTests(ProberTestCase):
    """
    Each step a probe can fail at makes a lone target not ready, names it in
    the report, counts the result, and never gets to MAIL.
    """

    def check(self, target: Target, stage: str, reason: str, advance: bool = False) -> None:
        prober = self.prober(listenerFor(target))
        if advance:
            self.tick()
        ready, text = prober.report()
        self.assertFalse(ready)
        self.assertFalse(prober.ready())
        self.assertEqual(
            text,
            "not ready\n"
            "listener smtp tcp://127.0.0.1:2525 has no target that answered its latest probe (smarthost)\n"
            f"target smarthost: tcp://mx1.example:25 failed at {stage}: {reason}\n",
        )
        self.assertEqual(value(self.metrics, "smtprelay_probe_results_total", target="smarthost", result=stage), 1.0)
        self.assertEqual(value(self.metrics, "smtprelay_target_ready", target="smarthost"), 0.0)
        self.assertEqual(value(self.metrics, "smtprelay_ready"), 0.0)
        server = self.net._servers.get(str(MX1))
        for connection in server.connections if server else []:
            self.assertNotIn(b"MAIL", bytes(connection.received))
        self.assertIn(
            f"probe: target smarthost: tcp://mx1.example:25 failed at {stage}: {reason}",
            self.logged(LogLevel.warn),
        )

    def test_connectRefused(self) -> None:
        self.check(makeTarget(), "connect", "connect failed: ConnectionRefusedError: "
                   "Connection was refused by other side: tcp://mx1.example:25.")

    def test_connectHangs(self) -> None:
        """
        A probe still unanswered when the next one is due has failed.
        """
        self.net.hang(str(MX1))
        self.check(makeTarget(), "timeout", "no answer before the next probe", advance=True)

    def test_greetingRefused(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": b"554 5.3.2 go away\r\n"}))
        self.check(makeTarget(), "greeting", "greeting 554 go away")

    def test_greetingStalls(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": STALL}))
        self.check(makeTarget(), "timeout", "no answer before the next probe", advance=True)

    def test_loop(self) -> None:
        self.net.add(str(MX1), Script(replies={"greeting": f"220 relay.example ESMTP smtprelay {TOKEN}\r\n".encode()}))
        self.check(makeTarget(), "greeting", "greets with our own loop token")

    def test_ehloRefused(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": b"554 5.7.1 no\r\n"}))
        self.check(makeTarget(), "ehlo", "EHLO/HELO refused: 554 no")

    def test_closedAtEhlo(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": CLOSE}))
        self.check(makeTarget(), "ehlo", "connection to mx1.example[192.0.2.25]:25 lost")

    def test_requireTLSNotOffered(self) -> None:
        self.net.add(str(MX1))
        self.check(makeTarget(requireTLS=True), "starttls", "no TLS available")

    def test_requireTLSHandshakeFails(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        self.check(makeTarget(requireTLS=True), "starttls", "TLS handshake with mx1.example[192.0.2.25]:25 failed")

    def test_requireTLSUnverified(self) -> None:
        """
        C{require_tls} with a peer whose certificate is not verified: the
        relay cannot deliver there, so it is not ready.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        self.check(
            makeTarget(requireTLS=True, tlsClient=ClientTLS()), "starttls",
            "TLS peer not verified: no certificate to check",
        )

    def test_authRefused(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}, auth=[b"535 5.7.8 bad credentials\r\n"]))
        self.check(
            makeTarget(auth=DownstreamAuth("plain", "relay", Secret("wrong"))), "auth",
            "PLAIN authentication refused: 535 bad credentials at mx1.example[192.0.2.25]:25",
        )

    def test_authNotOffered(self) -> None:
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO.replace(b"AUTH PLAIN LOGIN", b"AUTH CRAM-MD5")}))
        self.check(
            makeTarget(auth=DownstreamAuth("login", "relay", Secret("pw"))), "auth",
            "LOGIN authentication not offered at mx1.example[192.0.2.25]:25",
        )

    def test_passwordToUnverifiedPeer(self) -> None:
        """
        A password is never sent to a peer that is not verified, and a
        probe does not send it either: not ready.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        self.check(
            makeTarget(auth=DownstreamAuth("plain", "relay", Secret("pw")), tlsClient=ClientTLS()), "auth",
            "plain authentication needs a verified TLS peer (no certificate to check) at mx1.example[192.0.2.25]:25",
        )
        self.assertNotIn(b"AUTH", bytes(self.net._servers[str(MX1)].connections[0].received))


class ReadinessTests(ProberTestCase):
    def test_recovery(self) -> None:
        """
        A target down at start makes the relay not ready; once it answers a
        probe the relay is ready, and both changes are logged once.
        """
        prober = self.prober(listenerFor(makeTarget()))
        self.assertEqual(prober.report()[0], False)
        self.tick()
        self.net.add(str(MX1))
        self.tick()
        ready, text = prober.report()
        self.assertEqual((ready, text), (True, "ready\ntarget smarthost: tcp://mx1.example:25 ok\n"))
        self.assertEqual(value(self.metrics, "smtprelay_ready"), 1.0)
        self.assertEqual(value(self.metrics, "smtprelay_target_ready", target="smarthost"), 1.0)
        self.assertEqual(value(self.metrics, "smtprelay_probe_results_total", target="smarthost", result="connect"), 2.0)
        self.assertEqual(value(self.metrics, "smtprelay_probe_results_total", target="smarthost", result="ok"), 1.0)
        self.tick()
        self.assertEqual(
            [line.split(":")[0] for line in self.logged()],
            ["probe", "not ready", "probe", "ready"],
        )
        self.assertIn("probe: target smarthost: tcp://mx1.example:25 ok", self.logged(LogLevel.info))

    def test_failsAgain(self) -> None:
        """
        Readiness follows the latest probe: a target that stops answering
        makes the relay not ready at the next probe.
        """
        self.net.add(str(MX1))
        prober = self.prober(listenerFor(makeTarget()))
        self.assertTrue(prober.ready())
        del self.net._servers[str(MX1)]
        self.tick()
        self.assertFalse(prober.ready())

    def test_oneEndpointEnough(self) -> None:
        """
        A target with one endpoint answering is ready; the report still
        names the one that fails.
        """
        self.net.add(str(MX2))
        prober = self.prober(listenerFor(makeTarget(MX1, MX2)))
        ready, text = prober.report()
        self.assertTrue(ready)
        self.assertEqual(
            text.splitlines(),
            [
                "ready",
                "target smarthost: tcp://mx1.example:25 failed at connect: connect failed: ConnectionRefusedError: "
                "Connection was refused by other side: tcp://mx1.example:25.",
                "target smarthost: tcp://mx2.example:25 ok",
            ],
        )

    def test_notProbedYet(self) -> None:
        self.net.hang(str(MX1))
        prober = self.prober(listenerFor(makeTarget()))
        self.assertEqual(
            prober.report(),
            (
                False,
                "not ready\n"
                "listener smtp tcp://127.0.0.1:2525 has no target that answered its latest probe (smarthost)\n"
                "target smarthost: tcp://mx1.example:25 not probed yet\n",
            ),
        )

    def test_retryWithoutStartTLS(self) -> None:
        """
        A failed handshake without C{require_tls} or AUTH is retried in
        plain text, as a transaction would be: the target can deliver.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}), handshake="fail")
        prober = self.prober(listenerFor(makeTarget(attemptStartTLS=True)))
        self.assertTrue(prober.ready())
        self.assertEqual(len(self.net._servers[str(MX1)].connections), 2)

    def test_authForward(self) -> None:
        """
        C{auth forward} has no credentials to try: the probe checks TLS and
        that PLAIN or LOGIN is offered, and sends no AUTH.
        """
        self.net.add(str(MX1), Script(replies={"EHLO": TLS_EHLO}))
        prober = self.prober(listenerFor(makeTarget(auth=DownstreamAuth("forward"))))
        self.assertTrue(prober.ready())
        self.assertEqual(
            self.commands(MX1), [[b"EHLO relay.example", b"STARTTLS", b"EHLO relay.example", b"QUIT"]]
        )

    def test_routingOneTargetEnough(self) -> None:
        """
        A listener's targets are every target its routing names; one of them
        ready makes it ready.
        """
        corp = makeTarget(MX1, name="corp")
        other = makeTarget(MX2, name="other")
        routing = Routing((("example.org", corp),), Destinations((("example.net", other),), corp))
        self.net.add(str(MX2))
        prober = self.prober(listenerFor(routing))
        self.assertTrue(prober.ready())
        self.assertEqual(value(self.metrics, "smtprelay_target_ready", target="corp"), 0.0)
        self.assertEqual(value(self.metrics, "smtprelay_target_ready", target="other"), 1.0)
        self.assertEqual(self.net.attempts, [str(MX1), str(MX2)], "each target probed once")

    def test_rejectOnly(self) -> None:
        """
        A listener that only rejects has nothing to deliver to: it does not
        hold the relay back.
        """
        self.net.add(str(MX1))
        prober = self.prober(
            listenerFor(makeTarget()),
            listenerFor(Routing((), Reject()), address=Address("tcp", "127.0.0.1", 2526)),
        )
        self.assertEqual(prober.report(), (True, "ready\ntarget smarthost: tcp://mx1.example:25 ok\n"))

    def test_everyListener(self) -> None:
        """
        Every listener needs a ready target: one without makes the relay not
        ready and is named.
        """
        self.net.add(str(MX1))
        prober = self.prober(
            listenerFor(makeTarget(MX1)),
            listenerFor(makeTarget(MX2, name="dovecot", protocol="lmtp"), kind="lmtp",
                        address=Address("unix", path="/run/lmtp")),
        )
        ready, text = prober.report()
        self.assertFalse(ready)
        self.assertEqual(
            text.splitlines()[:2],
            ["not ready", "listener lmtp unix:///run/lmtp has no target that answered its latest probe (dovecot)"],
        )
        self.assertEqual(
            self.logged(LogLevel.warn)[-1],
            "not ready: listener lmtp unix:///run/lmtp has no target that answered its latest probe (dovecot)",
        )
