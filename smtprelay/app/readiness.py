"""
Readiness: whether the relay can deliver, from probes of its targets.

L{Prober} probes every endpoint of every target a listener may deliver to
(all the targets its routing names), at start and every C{probe_interval}:
the failover's own steps before a transaction (connect, greeting,
EHLO/LHLO, STARTTLS and the judgement of the peer, AUTH), then QUIT, never
MAIL.  A target is ready when one of its endpoints passed its latest probe;
the relay is ready when every listener has a ready target.  A probe still
unanswered when the next one is due has failed (C{timeout}).  Results are
counted, their changes logged, and L{Prober.report} says what C{/readyz}
answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from smtprelay.net.address import Address
from smtprelay.config.model import Listener, Target
from smtprelay.observe.metrics import IMetrics
from smtprelay.outbound.handshake import AttemptFailed
from smtprelay.relay.failover import Failover


@attrs.frozen
class ProbeResult:
    """
    The latest probe of one endpoint.

    @ivar stage: the step that failed (C{connect}, C{greeting}, C{tls},
        C{ehlo}, C{starttls}, C{auth}, C{timeout}), or L{None}: it passed.
    @ivar reason: why it failed (log-safe), or C{""}.
    """

    stage: str | None = None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.stage is None

    def __str__(self) -> str:
        return "ok" if self.ok else f"failed at {self.stage}: {self.reason}"


class Prober(Service):
    """
    The readiness probes of a relay's targets.

    @param listeners: the listeners whose targets are probed.
    @param failoverFor: the one failover of each target (the relay's own,
        whose handshake the probes use).
    @param clock: schedules the probes.
    @param interval: seconds between probes (C{probe_interval}).
    """

    _log = Logger()

    def __init__(
        self,
        listeners: Sequence[Listener],
        failoverFor: Callable[[Target], Failover],
        clock: IReactorTime,
        interval: float,
        metrics: IMetrics,
    ) -> None:
        self._listeners = [(listener, listener.targets) for listener in listeners]
        self._failovers: dict[int, Failover] = {}
        for _, targets in self._listeners:
            for target in targets:
                self._failovers.setdefault(id(target), failoverFor(target))
        self._metrics = metrics
        self._results: dict[tuple[int, Address], ProbeResult] = {}
        self._pending: dict[tuple[int, Address], Deferred[None]] = {}
        self._unreadyBefore: list[str] | None = None
        self._loop = LoopingCall(self.probe)
        self._loop.clock = clock
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.cancel()

    def probe(self) -> None:
        """
        Probe every endpoint of every target now; a probe of the previous
        round still unanswered fails as C{timeout} first.
        """
        late, self._pending = self._pending, {}
        for key, d in late.items():
            self._ended(key, ProbeResult("timeout", "no answer before the next probe"))
            d.cancel()
        for targetId, failover in self._failovers.items():
            for address in failover.policy.endpoints:
                key = (targetId, address)
                d = self._pending[key] = failover.probe(address)
                d.addCallbacks(self._passed, self._failed, callbackArgs=(key, d), errbackArgs=(key, d))

    def _passed(self, _: None, key: tuple[int, Address], d: Deferred[None]) -> None:
        if self._pending.get(key) is d:
            del self._pending[key]
            self._ended(key, ProbeResult())

    def _failed(self, failure: Failure, key: tuple[int, Address], d: Deferred[None]) -> None:
        if self._pending.get(key) is not d:
            return  # timed out or stopped: already accounted for
        del self._pending[key]
        if failure.check(AttemptFailed):
            error: AttemptFailed = failure.value
            result = ProbeResult(error.stage or "connect", error.reason)
        else:
            self._log.failure("probe of {endpoint} failed unexpectedly", failure, endpoint=str(key[1]))
            result = ProbeResult("connect", failure.getErrorMessage())
        self._ended(key, result)

    def _ended(self, key: tuple[int, Address], result: ProbeResult) -> None:
        """
        Record the probe of one endpoint: count it, log a change, and
        update the readiness.
        """
        target = self._failovers[key[0]].policy
        previous = self._results.get(key)
        self._results[key] = result
        self._metrics.probed(target.name, result.stage or "ok")
        if previous != result:
            if result.ok:
                self._log.info(
                    "probe: target {target}: {endpoint} ok", probe=True, target=target.name,
                    endpoint=str(key[1]),
                )
            else:
                self._log.warn(
                    "probe: target {target}: {endpoint} failed at {stage}: {reason}", probe=True,
                    target=target.name, endpoint=str(key[1]), stage=result.stage, reason=result.reason,
                )
        unready = self._unready()
        self._metrics.readiness(
            {f.policy.name: self._targetReady(targetId) for targetId, f in self._failovers.items()}, not unready
        )
        if unready != self._unreadyBefore:
            self._unreadyBefore = unready
            if unready:
                self._log.warn("not ready: {listeners}", listeners="; ".join(unready))
            else:
                self._log.info("ready: every listener has a target that answered its latest probe")

    def _targetReady(self, targetId: int) -> bool:
        return any(
            (result := self._results.get((targetId, address))) is not None and result.ok
            for address in self._failovers[targetId].policy.endpoints
        )

    def _unready(self) -> list[str]:
        """
        The listeners without a ready target, each with its targets.
        """
        return [
            f"{_name(listener)} has no target that answered its latest probe"
            f" ({', '.join(target.name for target in targets)})"
            for listener, targets in self._listeners
            if targets and not any(self._targetReady(id(target)) for target in targets)
        ]

    def ready(self) -> bool:
        """
        Whether every listener has a target with an endpoint that passed its
        latest probe (a listener without targets, which only rejects, is
        always ready).
        """
        return not self._unready()

    def report(self) -> tuple[bool, str]:
        """
        What C{/readyz} answers: whether the relay is ready, and a text
        that names the listeners that are not and every endpoint's latest
        probe.
        """
        ready = self.ready()
        lines = ["ready" if ready else "not ready", *self._unready()]
        for targetId, failover in self._failovers.items():
            target = failover.policy
            for address in target.endpoints:
                result = self._results.get((targetId, address))
                lines.append(f"target {target.name}: {address} {result if result else 'not probed yet'}")
        return ready, "\n".join(lines) + "\n"


def _name(listener: Listener) -> str:
    where = [str(a) for a in listener.addresses] + list(listener.endpoints)
    return f"listener {listener.kind} {' '.join(where)}"
