"""
The service tree: configuration in, listening relay out.

L{makeService} is the one function that turns a L{Config} into Twisted
services; the twistd plugin and C{relay.tac} both call it.  Shutdown is
graceful: stop accepting, tell idle sessions C{421 4.3.2}, let
transactions in flight finish until C{shutdown_timeout}, then abort them
(a body cut short never gets its end-of-data downstream).
"""

from __future__ import annotations

import functools
import hashlib
import signal
import sys
from typing import Any, Callable, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

import attrs
from twisted.protocols.tls import TLSMemoryBIOFactory

from smtprelay.config.model import Config, Listener, Target
from smtprelay.net.address import Address
from smtprelay.observe.metrics import IMetrics, Metrics, NullMetrics, Readiness, metricsResource
from smtprelay.inbound.proxyproto import ProxyProtocolFactory
from smtprelay.app.listeners import sessionPolicy
from smtprelay.app.readiness import Prober
from smtprelay.net.endpoints import serverEndpoint
from smtprelay.app.targets import makeFailover, makeRouter, targetRoute
from smtprelay.relay.failover import Failover
from smtprelay.interfaces import ClientSession
from smtprelay.relay.session import PasswordChecker, RelaySession
from smtprelay.relay.routing import Route, Router
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.app.tls import clientOptions, serverOptions

_log = Logger()


def loopToken(config: Config) -> str:
    """
    A short token for our greeting that identifies this deployment (to
    detect loops): the same in every process with the same hostname and listeners,
    so that a target that greets with it is ourselves.
    """
    seed = config.hostname + "\0" + "\0".join(
        str(address) for listener in config.listeners for address in listener.addresses
    )
    return hashlib.sha256(seed.encode("utf-8")).hexdigest()[:6]


class _Reloadable(Protocol):
    def reload(self) -> None: ...


class RelayService(MultiService):
    """
    The relay: its listeners, and a graceful stop.

    @ivar factories: the server factories, one per listener.
    @ivar failovers: one per target (by identity); their idle downstream
        connections are closed once the sessions have drained.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self.factories: list[SMTPServerFactory] = []
        self.failovers: dict[int, Failover] = {}
        self._listeners: list[IService] = []
        self._reloadables: list[tuple[str, _Reloadable]] = []

    def addListener(self, factory: SMTPServerFactory | None, service: IService) -> None:
        """
        A service that listens: bound in C{privilegedStartService}, stopped
        first on shutdown.  C{factory} is the SMTP factory whose sessions
        drain on shutdown (None for the metrics listener).
        """
        if factory is not None and factory not in self.factories:
            self.factories.append(factory)
        # A port we cannot bind must stop the process, not be logged and ignored.
        service._raiseSynchronously = True  # type: ignore[attr-defined]  # StreamServerEndpointService's private switch: listen errors raise
        self._listeners.append(service)

    def addReloadable(self, what: str, reloadable: _Reloadable) -> None:
        """
        Re-read C{reloadable}'s files on SIGHUP; C{what} names them in the
        log (C{"TLS certificates"}, C{"users file PATH"}).
        """
        self._reloadables.append((what, reloadable))

    def reload(self) -> None:
        """
        Re-read every server certificate and key and every C{auth users}
        file (SIGHUP); sessions stay.  One that fails keeps its old
        contents, and says so in the log.
        """
        for what, reloadable in self._reloadables:
            try:
                reloadable.reload()
            except Exception as e:
                _log.error("{what}: reload failed, keeping the old ones: {error}", what=what, error=e)
            else:
                _log.info("{what} reloaded", what=what)

    def serving(self) -> bool:
        """
        Whether the relay serves: started, not stopping, and every listener
        running (a port that cannot be bound stops the process instead).
        """
        return bool(self.running) and all(service.running for service in self._listeners)

    def privilegedStartService(self) -> None:
        # Bind the ports now, while twistd may still be root (--uid/--gid).
        super().privilegedStartService()
        for service in self._listeners:
            try:
                service.privilegedStartService()
            except CannotListenError as e:
                # One clear line instead of a traceback; twistd exits.
                print(f"smtprelay: cannot listen on {e.interface or '*'}:{e.port}: {e.socketError}",
                      file=sys.stderr)
                raise SystemExit(1)

    def startService(self) -> None:
        super().startService()
        for service in self._listeners:
            if not service.running:
                service.startService()
        if self._reloadables and hasattr(signal, "SIGHUP"):
            try:
                signal.signal(
                    signal.SIGHUP,
                    lambda *_: self._reactor.callFromThread(self.reload),
                )
            except ValueError:
                pass  # not the main thread (tests); SIGHUP stays untouched

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, then drain sessions until C{shutdown_timeout}.
        """
        stopping = [d for d in (s.stopService() for s in self._listeners) if d is not None]
        children = super().stopService()
        if children is not None:
            stopping.append(children)
        sessions = [p for f in self.factories for p in list(f.sessions)]
        for protocol in sessions:
            protocol.shutdown()
        drained = DeferredList([p.whenClosed() for p in sessions])
        deadline = self._reactor.callLater(
            self.config.shutdownTimeout, self._abortAll
        )

        def done(_: object) -> None:
            if deadline.active():
                deadline.cancel()
            for failover in self.failovers.values():
                failover.close()

        return DeferredList(stopping + [drained]).addCallback(done)

    def _abortAll(self) -> None:
        for factory in self.factories:
            for protocol in list(factory.sessions):
                transport: Any = protocol.transport
                transport.abortConnection()


def makeService(config: Config, reactor: Any) -> RelayService:
    """
    Build the relay's service tree from C{config}.
    """
    root = RelayService(config, reactor)
    token = loopToken(config)
    metrics: IMetrics = NullMetrics() if config.metrics is None else Metrics()
    failovers = root.failovers

    def failoverFor(target: Target) -> Failover:
        key = id(target)
        if key not in failovers:
            failovers[key] = makeFailover(target, reactor, loopToken=token, metrics=metrics)
        return failovers[key]

    def routeFor(target: Target) -> Route:
        failover = failoverFor(target)
        return targetRoute(target, failover.open, failover.release)

    for listener in config.listeners:
        tlsOptions = None
        if listener.tls is not None:
            tlsOptions = serverOptions(listener.tls)
            root.addReloadable("TLS certificates", tlsOptions)
        factory = SMTPServerFactory(
            sessionPolicy(listener),
            _handlerFactory(root, listener, makeRouter(listener.deliverTo, routeFor), config, reactor, metrics),
            config.hostname,
            reactor,
            tlsOptions=tlsOptions,
            greetingToken=token,
            metrics=metrics,
        )
        for address in listener.addresses:
            root.addListener(factory, _listen(reactor, listener, address, factory, tlsOptions))
        for description in listener.endpoints:
            endpoint = serverFromString(reactor, description)
            root.addListener(factory, StreamServerEndpointService(endpoint, _proxied(reactor, listener, factory)))
        metrics.connectionLimit(listener.kind, listener.maxConnections)
    if config.metrics is not None:
        assert isinstance(metrics, Metrics)
        # Probes only where /readyz is served to read them.
        prober = Prober(config.listeners, failoverFor, reactor, config.probeInterval, metrics)
        prober.setServiceParent(root)

        def readiness() -> tuple[bool, str]:
            return prober.report() if root.serving() else (False, "not serving\n")

        root.addListener(None, metricsService(config.metrics, metrics, reactor, root.serving, readiness))
    return root


def metricsService(
    address: Address, metrics: Metrics, reactor: Any, serving: Callable[[], bool],
    readiness: Readiness | None = None,
) -> IService:
    """
    A service that serves L{metricsResource} over HTTP on C{address}
    (C{tcp://} or C{unix://}; there is no TLS for metrics, put a proxy in
    front for that).

    @raise ValueError: for a C{tls://} address.
    """
    if address.scheme == "tls":
        raise ValueError(f"metrics cannot listen on {address}: use tcp:// or unix://")
    # twisted.web only where metrics are served (see metricsweb).
    from smtprelay.observe.metricsweb import QuietSite

    endpoint = serverEndpoint(reactor, address)
    return StreamServerEndpointService(endpoint, QuietSite(metricsResource(metrics, serving, readiness)))


def _proxied(reactor: Any, listener: Listener, factory: Any) -> Any:
    """
    C{factory}, behind a PROXY protocol reader when the listener has
    trusted proxies.
    """
    if not listener.proxyProtocol:
        return factory
    return ProxyProtocolFactory(factory, listener.proxyProtocol, reactor, listener.proxyTimeout)


def _listen(
    reactor: Any, listener: Listener, address: Address, factory: SMTPServerFactory, tlsOptions: Any
) -> IService:
    """
    The listening service of one address.  Behind the PROXY protocol the
    header comes before any TLS handshake, so for C{tls://} the TLS layer
    goes inside the PROXY reader.
    """
    if listener.proxyProtocol and address.scheme == "tls":
        endpoint = serverEndpoint(reactor, attrs.evolve(address, scheme="tcp"), None, listener.reusePort)
        inner: Any = TLSMemoryBIOFactory(tlsOptions, False, factory)
        return StreamServerEndpointService(endpoint, _proxied(reactor, listener, inner))
    endpoint = serverEndpoint(reactor, address, tlsOptions, reusePort=listener.reusePort)
    return StreamServerEndpointService(endpoint, _proxied(reactor, listener, factory))


def _handlerFactory(
    root: RelayService, listener: Listener, router: Router, config: Config, reactor: Any,
    metrics: IMetrics,
) -> Callable[[ClientSession], RelaySession]:
    checker: PasswordChecker | None = None
    if listener.auth.mode == "users" and listener.auth.usersFile:
        from smtprelay.inbound.users import UsersFile

        users = UsersFile(listener.auth.usersFile)
        root.addReloadable(f"users file {users.path}", users)
        checker = lambda user, password: succeed(users.check(user, password))

    def handlerFor(session: ClientSession) -> RelaySession:
        return RelaySession(session, listener.auth.mode, router, config.hostname, reactor, checker, metrics)

    return handlerFor
