"""
Prometheus metrics (docs/operations.md) and the web resource that serves them.

The engines report through L{IMetrics}: L{Metrics} counts into its own
C{CollectorRegistry} (no global state), L{NullMetrics} ignores everything
when no C{metrics} listener is configured.  Labels are few and bounded:
listener kinds, target names from the configuration, and fixed words for
statuses, results and reasons.  C{prometheus_client} is the optional
C{metrics} extra: it is imported only when a L{Metrics} is made, and
C{twisted.web} (a few megabytes of memory) only when it is served
(L{smtprelay.app.service.metricsService} listens for it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Callable

from zope.interface import Interface, implementer

from smtprelay.interfaces import LISTENER_KINDS

if TYPE_CHECKING:
    from twisted.web.resource import IResource

MISSING = "metrics need the \"metrics\" extra: pip install 'smtprelay[metrics]'"

STATUSES = ("sent", "deferred", "bounced", "aborted")
TLS_SIDES = ("inbound", "outbound")

ATTEMPT_RESULTS = (
    "ok", "reused", "connect_failed", "greeting", "ehlo", "tls", "auth", "mail", "timeout", "loop", "lost",
)
"""The usual values of C{result} for L{IMetrics.attempt} (not enforced)."""

REJECTION_REASONS = frozenset({
    "relay_denied", "auth_required", "tls_required", "too_big", "bare_lf", "too_many_hops",
    "too_many_recipients", "auth_failed", "auth_aborted", "too_many_auth_failures", "sync",
    "line_too_long", "too_much_input", "unknown_command", "not_implemented", "syntax",
    "bad_sequence", "timeout", "too_many_connections", "too_many_errors",
    "rate_connections", "rate_messages", "rate_recipients",
})
"""Every value of C{reason} for L{IMetrics.rejected}: each local refusal
names its own where it is made (docs/operations.md, Logs, metrics, shutdown)."""

CONNECT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
END_OF_DATA_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 720.0,
)


class IMetrics(Interface):
    """
    What the engines report.  Every method is cheap and never raises for a
    well-formed call.
    """

    def sessionOpened(kind: str) -> None:
        """
        A client connected to a listener of C{kind} (smtp, submission, lmtp).
        """

    def sessionClosed(kind: str) -> None:
        """
        A client session of a C{kind} listener ended.
        """

    def transaction(
        status: str, size: int = 0, target: str | None = None,
        endOfDataSeconds: float | None = None,
    ) -> None:
        """
        A transaction ended with C{status} (sent, deferred, bounced,
        aborted): the one per-transaction log line's status.  C{size} bytes
        count as relayed when the status is C{sent}; C{endOfDataSeconds} is
        the time from our end-of-data dot to the downstream's final reply
        at C{target}, when there was one.
        """

    def attempt(target: str, result: str, connectSeconds: float | None = None) -> None:
        """
        One downstream attempt at C{target} ended with C{result} (C{ok} or
        the step that failed, see L{ATTEMPT_RESULTS}); C{connectSeconds} is
        how long the connection took to establish, when it was.
        """

    def failover(target: str) -> None:
        """
        The relay gave up on C{target} for a transaction and tried the next.
        """

    def tlsHandshake(side: str, ok: bool, verified: bool = False) -> None:
        """
        A TLS handshake ended: C{side} is inbound (STARTTLS or implicit TLS
        from a client) or outbound (to a downstream); C{verified}: the
        peer's certificate was verified (a downstream's chain and name).
        """

    def rejected(reason: str) -> None:
        """
        The relay refused something locally (see L{REJECTION_REASONS}).
        """

    def connectionLimit(kind: str, limit: int) -> None:
        """
        A listener of C{kind} accepts at most C{limit} sessions at once
        (its C{max_connections}); said once per listener at start.
        """

    def probed(target: str, result: str) -> None:
        """
        A readiness probe of an endpoint of C{target} ended with C{result}:
        C{ok}, or the step that failed (C{connect}, C{greeting}, C{tls},
        C{ehlo}, C{starttls}, C{auth}, C{timeout}).
        """

    def readiness(targets: Mapping[str, bool], ready: bool) -> None:
        """
        After a probe: which targets have an endpoint that passed its latest
        probe, and whether the relay is ready (every listener has one).
        """


@implementer(IMetrics)
class NullMetrics:
    """
    Metrics that go nowhere: used when no C{metrics} listener is set.
    """

    def sessionOpened(self, kind: str) -> None:
        pass

    def sessionClosed(self, kind: str) -> None:
        pass

    def transaction(
        self, status: str, size: int = 0, target: str | None = None,
        endOfDataSeconds: float | None = None,
    ) -> None:
        pass

    def attempt(self, target: str, result: str, connectSeconds: float | None = None) -> None:
        pass

    def failover(self, target: str) -> None:
        pass

    def tlsHandshake(self, side: str, ok: bool, verified: bool = False) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass

    def connectionLimit(self, kind: str, limit: int) -> None:
        pass

    def probed(self, target: str, result: str) -> None:
        pass

    def readiness(self, targets: Mapping[str, bool], ready: bool) -> None:
        pass


@implementer(IMetrics)
class Metrics:
    """
    Metrics counted into a registry of their own.

    @ivar registry: the C{prometheus_client.CollectorRegistry} to expose.
    """

    def __init__(self) -> None:
        """
        @raise ImportError: C{prometheus_client} is not installed.
        """
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        except ImportError as e:
            raise ImportError(MISSING) from e
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._sessionsOpen = Gauge(
            "smtprelay_sessions_open", "Client sessions open now.", ["listener"],
            registry=registry,
        )
        self._sessions = Counter(
            "smtprelay_sessions", "Client sessions accepted.", ["listener"], registry=registry
        )
        self._transactions = Counter(
            "smtprelay_transactions", "Transactions ended, by status.", ["status"],
            registry=registry,
        )
        self._attempts = Counter(
            "smtprelay_downstream_attempts", "Downstream attempts, by target and result.",
            ["target", "result"], registry=registry,
        )
        self._failovers = Counter(
            "smtprelay_failovers", "Targets given up on in favour of the next.", ["target"],
            registry=registry,
        )
        self._bytes = Counter(
            "smtprelay_bytes_relayed", "Message bytes accepted by downstreams.",
            registry=registry,
        )
        self._connectSeconds = Histogram(
            "smtprelay_connect_seconds", "Time to connect to a downstream.", ["target"],
            buckets=CONNECT_BUCKETS, registry=registry,
        )
        self._endOfDataSeconds = Histogram(
            "smtprelay_end_of_data_seconds",
            "Time from the end-of-data dot to the downstream's final reply.", ["target"],
            buckets=END_OF_DATA_BUCKETS, registry=registry,
        )
        self._tls = Counter(
            "smtprelay_tls_handshakes", "TLS handshakes, by side, result and peer verification.",
            ["side", "result", "verified"], registry=registry,
        )
        self._rejections = Counter(
            "smtprelay_rejections", "Local refusals, by reason.", ["reason"], registry=registry
        )
        self._connectionLimit = Gauge(
            "smtprelay_max_connections",
            "Sessions the listeners of a kind accept at once (the sum of their max_connections).",
            ["listener"], registry=registry,
        )
        self._probes = Counter(
            "smtprelay_probe_results", "Readiness probes of target endpoints, by result.",
            ["target", "result"], registry=registry,
        )
        self._targetReady = Gauge(
            "smtprelay_target_ready", "1 when an endpoint of the target passed its latest probe.",
            ["target"], registry=registry,
        )
        self._ready = Gauge(
            "smtprelay_ready", "1 when every listener has a target that passed its latest probe.",
            registry=registry,
        )
        # Known label values start at 0, so rates work from the first scrape.
        for kind in LISTENER_KINDS:
            self._sessionsOpen.labels(kind)
            self._sessions.labels(kind)
            self._connectionLimit.labels(kind)
        for status in STATUSES:
            self._transactions.labels(status)
        # A reason's first refusals would be invisible to rate() if its
        # series appeared with them.
        for reason in REJECTION_REASONS:
            self._rejections.labels(reason)
        for side in TLS_SIDES:
            for result in ("ok", "failed"):
                self._tls.labels(side, result, "no")
        self._tls.labels("outbound", "ok", "yes")

    def sessionOpened(self, kind: str) -> None:
        self._sessionsOpen.labels(kind).inc()
        self._sessions.labels(kind).inc()

    def sessionClosed(self, kind: str) -> None:
        self._sessionsOpen.labels(kind).dec()

    def transaction(
        self, status: str, size: int = 0, target: str | None = None,
        endOfDataSeconds: float | None = None,
    ) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown transaction status {status!r}")
        self._transactions.labels(status).inc()
        if status == "sent" and size > 0:
            self._bytes.inc(size)
        if target is not None and endOfDataSeconds is not None:
            self._endOfDataSeconds.labels(target).observe(endOfDataSeconds)

    def attempt(self, target: str, result: str, connectSeconds: float | None = None) -> None:
        self._attempts.labels(target, result).inc()
        if connectSeconds is not None:
            self._connectSeconds.labels(target).observe(connectSeconds)

    def failover(self, target: str) -> None:
        self._failovers.labels(target).inc()

    def tlsHandshake(self, side: str, ok: bool, verified: bool = False) -> None:
        if side not in TLS_SIDES:
            raise ValueError(f"unknown TLS side {side!r}")
        self._tls.labels(side, "ok" if ok else "failed", "yes" if verified else "no").inc()

    def rejected(self, reason: str) -> None:
        if reason not in REJECTION_REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        self._rejections.labels(reason).inc()

    def connectionLimit(self, kind: str, limit: int) -> None:
        self._connectionLimit.labels(kind).inc(limit)

    def probed(self, target: str, result: str) -> None:
        self._probes.labels(target, result).inc()

    def readiness(self, targets: Mapping[str, bool], ready: bool) -> None:
        for target, targetReady in targets.items():
            self._targetReady.labels(target).set(1 if targetReady else 0)
        self._ready.set(1 if ready else 0)

    def exposition(self) -> tuple[bytes, str]:
        """
        The registry in the Prometheus text format.

        @return: the body and its C{Content-Type}.
        """
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


Readiness = Callable[[], "tuple[bool, str]"]
"""C{() → (ready, text)}: what C{/readyz} answers."""


def metricsResource(
    metrics: Metrics, serving: Callable[[], bool], readiness: Readiness | None = None
) -> IResource:
    """
    The web resource to put at the root of a site: serves C{metrics} on
    C{/metrics}, the liveness check on C{/healthz} (200 while C{serving()}
    is true, else 503) and, with C{readiness}, the readiness check on
    C{/readyz} (200 or 503 as C{readiness()} says, with its text), all GET
    and HEAD; 404 elsewhere.
    """
    from smtprelay.observe.metricsweb import MetricsResource

    return MetricsResource(metrics, serving, readiness)
