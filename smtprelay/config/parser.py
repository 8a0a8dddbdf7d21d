"""
The directives of docs/configuration.md: a node tree from L{smtprelay.config.lexer} checked
and turned into the frozen L{Config} of L{smtprelay.config.model}.

This module reads the top level (the global directives, whose values are
the defaults of listeners and targets) and hands the blocks to
L{smtprelay.config.targets}, L{smtprelay.config.listeners} and, through
them, L{smtprelay.config.routing}; L{smtprelay.config.directives} holds
what they share.  Unknown and duplicate directives, wrong argument counts
and bad values are all collected and raised together as one
L{smtprelay.config.lexer.ConfigError}, one C{FILE:LINE: message} each, in
file order.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import attrs

from smtprelay.net.address import parseAddress
from .directives import (
    Context,
    Directive,
    duration,
    flag,
    hostname,
    one,
    readBlock,
    timeout,
)
from .lexer import Node, parseTree, readTree
from .listeners import LISTENER, LISTENER_KINDS, SERVER_TLS, listener, serverTLS
from .model import Address, ClientTLS, Config, Target
from .routing import ROUTING
from .targets import CLIENT_TLS, TARGET, TARGET_KINDS, clientTLS, namedTarget
from .values import toALabel


def _metrics(node: Node, ctx: Context) -> Address:
    address = parseAddress(one(node, "ADDRESS"))
    if address.scheme != "tcp":
        raise ValueError("must be a tcp://HOST:PORT address")
    return address


def _keep(node: Node, ctx: Context) -> Node:
    # Listener and target blocks are read after the globals they default to.
    return node


_TOP = {
    "hostname": Directive("hostname", hostname),
    "debug": Directive("debug", flag),
    "tls": Directive("tls", serverTLS),
    "tls_client": Directive("tlsClient", clientTLS),
    "metrics": Directive("metrics", _metrics),
    "shutdown_timeout": Directive("shutdownTimeout", duration),
    "probe_interval": Directive("probeInterval", timeout),
    **{kind: Directive(kind, _keep, repeatable=True) for kind in LISTENER_KINDS + TARGET_KINDS},
}

DIRECTIVES: Mapping[str, Collection[str]] = {
    "top level": _TOP.keys(),
    "listener": LISTENER.keys(),
    "routing": ROUTING,
    "target": TARGET.keys(),
    "tls": SERVER_TLS.keys(),
    "tls_client": CLIENT_TLS.keys(),
}
"""The directives the parser knows, by the kind of block they go in: the
very tables it dispatches on (the reference in docs/configuration.md is
checked against them)."""


def defaultHostname(resolver: Any = socket) -> str:
    """
    This host's name as C{hostname -f} gives it: the canonical name of
    C{gethostname()}, else C{getfqdn()}, else C{gethostname()} itself,
    the first that is not C{localhost} (C{getfqdn} gives C{localhost}
    when the host name is an alias of 127.0.0.1), preferring a dotted
    name; IDNA A-labels.

    @param resolver: provides C{gethostname}, C{getfqdn} and
        C{getaddrinfo} (the C{socket} module).
    """
    name = resolver.gethostname()
    try:
        canonical = resolver.getaddrinfo(name, None, flags=socket.AI_CANONNAME)[0][3]
    except (OSError, IndexError):
        canonical = ""
    candidates = [c for c in (canonical, resolver.getfqdn(name), name)
                  if c and not c.lower().startswith("localhost")]
    dotted = [c for c in candidates if "." in c.strip(".")]
    chosen = (dotted or candidates or [name])[0]
    try:
        return toALabel(chosen)
    except ValueError:
        return chosen


def build(nodes: Sequence[Node], source: str) -> Config:
    """
    Check the top-level C{nodes} of a configuration read from C{source} and
    build the L{Config} they describe.

    @raise ConfigError: every problem found, in file order.
    """
    ctx = Context()
    values, _ = readBlock(nodes, _TOP, ctx)
    for kind in LISTENER_KINDS + TARGET_KINDS:
        values.pop(kind, None)
    ctx.hostname = values.setdefault("hostname", defaultHostname())
    ctx.debug = values.get("debug", False)
    ctx.tls = values.get("tls")
    ctx.tlsClient = values.get("tlsClient", ClientTLS())

    named: dict[str, Target | None] = {}
    for node in nodes:
        if node.name in TARGET_KINDS:
            namedTarget(node, ctx, named)
    listeners = []
    listenerNodes = [node for node in nodes if node.name in LISTENER_KINDS]
    for number, node in enumerate(listenerNodes, 1):
        built = listener(node.name, number, node, ctx, named)
        if built is not None:
            listeners.append(built)
    if not listenerNodes:
        ctx.errors.append((source, 1, "no listeners (add an smtp, submission or lmtp block)"))

    ctx.check(nodes, source)
    return Config(
        listeners=tuple(listeners),
        targets=tuple(target for target in named.values() if target is not None),
        source=source,
        **values,
    )


def loadString(
    text: str, filename: str = "<string>", env: Mapping[str, str] | None = None
) -> Config:
    """
    Parse the configuration C{text} as if read from C{filename}.

    @param env: the environment for C{{env:NAME}} (default L{os.environ}).
    @raise ConfigError: the configuration is invalid.
    """
    recorded = _RecordingEnvironment(os.environ if env is None else env)
    return _withEnvironment(build(parseTree(text, filename, recorded), filename), recorded)


def load(path: str) -> Config:
    """
    Read and check the configuration file at C{path}.

    @raise ConfigError: it cannot be read or is invalid.
    """
    recorded = _RecordingEnvironment(os.environ)
    return _withEnvironment(build(readTree(path, recorded), path), recorded)


class _RecordingEnvironment(Mapping[str, str]):
    """
    An environment that remembers which variables were looked up.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.names: dict[str, bool] = {}

    def __getitem__(self, name: str) -> str:
        self.names[name] = name in self._env
        return self._env[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def _withEnvironment(config: Config, recorded: _RecordingEnvironment) -> Config:
    return attrs.evolve(config, environment=tuple(sorted(recorded.names.items())))
