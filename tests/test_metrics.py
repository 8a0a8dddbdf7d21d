"""
Tests for L{smtprelay.observe.metrics}: the counters, and a real scrape of
C{/metrics} over loopback HTTP parsed with C{prometheus_client}'s parser.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor as globalReactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from twisted.web.server import Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from smtprelay.app.service import metricsService
from smtprelay.net.address import Address
from smtprelay.observe.metrics import (
    MISSING,
    IMetrics,
    Metrics,
    NullMetrics,
    REJECTION_REASONS,
    metricsResource,
)

reactor: Any = globalReactor


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def exercise(metrics: Any) -> None:
    """
    One call of every method, as the engines would make them.
    """
    metrics.sessionOpened("smtp")
    metrics.sessionOpened("smtp")
    metrics.sessionOpened("lmtp")
    metrics.sessionClosed("smtp")
    metrics.transaction("sent", 1000, "smarthost", 0.2)
    metrics.transaction("sent", 500, "smarthost", 3.0)
    metrics.transaction("deferred", 700, "smarthost", None)
    metrics.transaction("aborted", 300)
    metrics.attempt("smarthost", "connect_failed")
    metrics.attempt("smarthost", "ok", 0.004)
    metrics.failover("smarthost")
    metrics.tlsHandshake("outbound", True)
    metrics.tlsHandshake("outbound", True, verified=True)
    metrics.tlsHandshake("inbound", False)
    metrics.rejected("relay_denied")
    metrics.rejected("relay_denied")
    metrics.connectionLimit("smtp", 500)
    metrics.connectionLimit("smtp", 100)
    metrics.probed("smarthost", "ok")
    metrics.probed("smarthost", "auth")
    metrics.probed("smarthost", "auth")
    metrics.readiness({"smarthost": True, "dovecot": False}, False)


class MetricsTests(SynchronousTestCase):
    """
    L{Metrics} and L{NullMetrics} as the engines use them.
    """

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IMetrics, Metrics()))
        self.assertTrue(verifyObject(IMetrics, NullMetrics()))

    def test_nullMetrics(self) -> None:
        exercise(NullMetrics())

    def test_countersMove(self) -> None:
        metrics = Metrics()
        exercise(metrics)
        expected = {
            ("smtprelay_sessions_open", (("listener", "smtp"),)): 1.0,
            ("smtprelay_sessions_open", (("listener", "lmtp"),)): 1.0,
            ("smtprelay_sessions_open", (("listener", "submission"),)): 0.0,
            ("smtprelay_sessions_total", (("listener", "smtp"),)): 2.0,
            ("smtprelay_sessions_total", (("listener", "lmtp"),)): 1.0,
            ("smtprelay_transactions_total", (("status", "sent"),)): 2.0,
            ("smtprelay_transactions_total", (("status", "deferred"),)): 1.0,
            ("smtprelay_transactions_total", (("status", "bounced"),)): 0.0,
            ("smtprelay_transactions_total", (("status", "aborted"),)): 1.0,
            ("smtprelay_bytes_relayed_total", ()): 1500.0,
            (
                "smtprelay_downstream_attempts_total",
                (("target", "smarthost"), ("result", "connect_failed")),
            ): 1.0,
            (
                "smtprelay_downstream_attempts_total",
                (("target", "smarthost"), ("result", "ok")),
            ): 1.0,
            ("smtprelay_failovers_total", (("target", "smarthost"),)): 1.0,
            ("smtprelay_connect_seconds_count", (("target", "smarthost"),)): 1.0,
            ("smtprelay_connect_seconds_sum", (("target", "smarthost"),)): 0.004,
            (
                "smtprelay_connect_seconds_bucket",
                (("target", "smarthost"), ("le", "0.001")),
            ): 0.0,
            (
                "smtprelay_connect_seconds_bucket",
                (("target", "smarthost"), ("le", "0.005")),
            ): 1.0,
            ("smtprelay_end_of_data_seconds_count", (("target", "smarthost"),)): 2.0,
            ("smtprelay_end_of_data_seconds_sum", (("target", "smarthost"),)): 3.2,
            (
                "smtprelay_end_of_data_seconds_bucket",
                (("target", "smarthost"), ("le", "2.5")),
            ): 1.0,
            ("smtprelay_tls_handshakes_total", (("side", "outbound"), ("result", "ok"), ("verified", "no"))): 1.0,
            ("smtprelay_tls_handshakes_total", (("side", "outbound"), ("result", "ok"), ("verified", "yes"))): 1.0,
            ("smtprelay_tls_handshakes_total", (("side", "inbound"), ("result", "failed"), ("verified", "no"))): 1.0,
            ("smtprelay_tls_handshakes_total", (("side", "inbound"), ("result", "ok"), ("verified", "no"))): 0.0,
            ("smtprelay_rejections_total", (("reason", "relay_denied"),)): 2.0,
            ("smtprelay_max_connections", (("listener", "smtp"),)): 600.0,
            ("smtprelay_max_connections", (("listener", "lmtp"),)): 0.0,
            ("smtprelay_probe_results_total", (("target", "smarthost"), ("result", "ok"))): 1.0,
            ("smtprelay_probe_results_total", (("target", "smarthost"), ("result", "auth"))): 2.0,
            ("smtprelay_target_ready", (("target", "smarthost"),)): 1.0,
            ("smtprelay_target_ready", (("target", "dovecot"),)): 0.0,
            ("smtprelay_ready", ()): 0.0,
        }
        actual = {key: value(metrics, key[0], **dict(key[1])) for key in expected}
        self.assertEqual(actual, expected)

    def test_nothingBeforeUse(self) -> None:
        """
        A fresh object has zeros for known labels and nothing for others.
        """
        metrics = Metrics()
        self.assertEqual(value(metrics, "smtprelay_transactions_total", status="sent"), 0.0)
        self.assertEqual(value(metrics, "smtprelay_bytes_relayed_total"), 0.0)
        self.assertIsNone(value(metrics, "smtprelay_failovers_total", target="smarthost"))
        for reason in REJECTION_REASONS:
            self.assertEqual(value(metrics, "smtprelay_rejections_total", reason=reason), 0.0)

    def test_independent(self) -> None:
        """
        Two L{Metrics} share no state (each has its own registry).
        """
        one, two = Metrics(), Metrics()
        one.rejected("too_big")
        one.sessionOpened("smtp")
        self.assertEqual(value(one, "smtprelay_rejections_total", reason="too_big"), 1.0)
        self.assertEqual(value(two, "smtprelay_rejections_total", reason="too_big"), 0.0)
        self.assertEqual(value(two, "smtprelay_sessions_open", listener="smtp"), 0.0)
        self.assertIsNot(one.registry, two.registry)

    def test_badWords(self) -> None:
        """
        Status and TLS side are closed sets: a typo is a bug, not a series.
        """
        metrics = Metrics()
        self.assertRaises(ValueError, metrics.transaction, "queued")
        self.assertRaises(ValueError, metrics.tlsHandshake, "both", True)

    def test_exposition(self) -> None:
        metrics = Metrics()
        metrics.rejected("bare_lf")
        body, contentType = metrics.exposition()
        self.assertEqual(contentType, CONTENT_TYPE_LATEST)
        self.assertIn(b'smtprelay_rejections_total{reason="bare_lf"} 1.0\n', body)

    def test_missingExtra(self) -> None:
        """
        Without C{prometheus_client}, importing the module works and making
        L{Metrics} says which extra to install.
        """
        saved = sys.modules["prometheus_client"]
        sys.modules["prometheus_client"] = None  # type: ignore[assignment]  # None in sys.modules makes the import fail, as when the extra is not installed
        self.addCleanup(sys.modules.__setitem__, "prometheus_client", saved)
        error = self.assertRaises(ImportError, Metrics)
        self.assertEqual(str(error), MISSING)
        self.assertEqual(
            MISSING, "metrics need the \"metrics\" extra: pip install 'smtprelay[metrics]'"
        )

    def test_noTLSListener(self) -> None:
        self.assertRaises(
            ValueError, metricsService, Address("tls", "127.0.0.1", 9749), Metrics(), reactor, lambda: True
        )


@implementer(IAgentEndpointFactory)
class _UNIXEndpoints:
    def __init__(self, path: str) -> None:
        self._path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self._path)


class ScrapeTests(TestCase):
    """
    C{/metrics} over real loopback HTTP.
    """

    def listen(
        self, metrics: Metrics, serving: Callable[[], bool] = lambda: True,
        readiness: Callable[[], tuple[bool, str]] | None = None,
    ) -> str:
        port = reactor.listenTCP(
            0, Site(metricsResource(metrics, serving, readiness)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    def get(self, url: str, method: bytes = b"GET", agent: Any = None) -> Deferred[Any]:
        agent = agent or Agent(reactor)
        d = agent.request(method, url.encode("ascii"), Headers())

        def read(response: Any) -> Deferred[tuple[Any, bytes]]:
            return readBody(response).addCallback(lambda body: (response, body))

        return d.addCallback(read)

    @inlineCallbacks
    def test_scrape(self) -> Any:
        """
        The scrape parses with Prometheus' own parser and shows the counts.
        """
        metrics = Metrics()
        exercise(metrics)
        base = self.listen(metrics)
        response, body = yield self.get(base + "/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode()]
        )
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
        self.assertEqual(
            sorted(
                name
                for name in families
                if name.startswith("smtprelay_") and not name.endswith("_created")
            ),
            [
                "smtprelay_bytes_relayed",
                "smtprelay_connect_seconds",
                "smtprelay_downstream_attempts",
                "smtprelay_end_of_data_seconds",
                "smtprelay_failovers",
                "smtprelay_max_connections",
                "smtprelay_probe_results",
                "smtprelay_ready",
                "smtprelay_rejections",
                "smtprelay_sessions",
                "smtprelay_sessions_open",
                "smtprelay_target_ready",
                "smtprelay_tls_handshakes",
                "smtprelay_transactions",
            ],
        )
        self.assertEqual(families["smtprelay_sessions_open"].type, "gauge")
        self.assertEqual(families["smtprelay_connect_seconds"].type, "histogram")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in families.values()
            for s in family.samples
        }
        self.assertEqual(samples[("smtprelay_transactions_total", (("status", "sent"),))], 2.0)
        self.assertEqual(samples[("smtprelay_bytes_relayed_total", ())], 1500.0)
        self.assertEqual(
            samples[("smtprelay_rejections_total", (("reason", "relay_denied"),))], 2.0
        )
        metrics.rejected("relay_denied")
        response, body = yield self.get(base + "/metrics?x=1")
        self.assertIn(b'smtprelay_rejections_total{reason="relay_denied"} 3.0\n', body)

    @inlineCallbacks
    def test_otherPaths(self) -> Any:
        base = self.listen(Metrics())
        for path in ["/", "/metric", "/metrics/", "/metrics/x", "/favicon.ico"]:
            response, body = yield self.get(base + path)
            self.assertEqual((path, response.code), (path, 404))
            self.assertNotIn(b"smtprelay_", body)

    @inlineCallbacks
    def test_methods(self) -> Any:
        base = self.listen(Metrics())
        response, body = yield self.get(base + "/metrics", b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        response, body = yield self.get(base + "/metrics", b"POST")
        self.assertEqual(response.code, 405)

    @inlineCallbacks
    def test_healthz(self) -> Any:
        """
        C{/healthz} answers 200 while the relay serves and 503 once it does
        not (GET and HEAD); it shows no metrics.
        """
        serving = [True]
        base = self.listen(Metrics(), lambda: serving[0])
        response, body = yield self.get(base + "/healthz")
        self.assertEqual((response.code, body), (200, b"serving\n"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        response, body = yield self.get(base + "/healthz", b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        serving[0] = False
        response, body = yield self.get(base + "/healthz")
        self.assertEqual((response.code, body), (503, b"not serving\n"))
        response, body = yield self.get(base + "/healthz/")
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_readyz(self) -> Any:
        """
        C{/readyz} answers 200 or 503 as the readiness says, with its text
        (GET and HEAD); without a readiness it does not exist.
        """
        state = [(False, "not ready\ntarget t: tcp://mx.test:25 failed at auth: no\n")]
        base = self.listen(Metrics(), readiness=lambda: state[0])
        response, body = yield self.get(base + "/readyz")
        self.assertEqual((response.code, body), (503, state[0][1].encode()))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        state[0] = (True, "ready\n")
        response, body = yield self.get(base + "/readyz")
        self.assertEqual((response.code, body), (200, b"ready\n"))
        response, body = yield self.get(base + "/readyz", b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        response, body = yield self.get(self.listen(Metrics()) + "/readyz")
        self.assertEqual(response.code, 404)

    @inlineCallbacks
    def test_service(self) -> Any:
        """
        L{metricsService} listens on its address while running.
        """
        path = self.mktemp()
        metrics = Metrics()
        metrics.failover("mx1")
        service = metricsService(Address("unix", path=path), metrics, reactor, lambda: True)
        service.startService()
        agent = Agent.usingEndpointFactory(reactor, _UNIXEndpoints(path))
        try:
            response, body = yield self.get("http://metrics/metrics", agent=agent)
        finally:
            yield service.stopService()
        self.assertEqual(response.code, 200)
        self.assertIn(b'smtprelay_failovers_total{target="mx1"} 1.0\n', body)
