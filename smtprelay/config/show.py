"""
The effective configuration written back in the configuration language
(C{smtprelay-check --show}): every setting spelled out with its default
filled in, passwords masked as C{****}.

Parsing the output again gives the same L{Config}, except for the masked
passwords.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TypeVar

import attrs

from .lexer import fromEnvironment
from .model import (
    ClientTLS,
    Config,
    Decision,
    Destinations,
    DownstreamAuth,
    Handling,
    Listener,
    Reject,
    Routing,
    ServerTLS,
    Target,
)
from .values import formatBool, formatDuration, formatSize

_V = TypeVar("_V")

_PLAIN = re.compile(r'[^\s"#{}\\]+')
_INDENT = "    "


def _quote(word: str) -> str:
    if _PLAIN.fullmatch(word) and not fromEnvironment(word):
        return word
    return '"' + word.replace('"', '\\"') + '"'


def _line(depth: int, *words: object) -> str:
    return _INDENT * depth + " ".join(_quote(str(word)) for word in words)


def _block(depth: int, head: list[object], body: Iterable[str]) -> list[str]:
    lines = list(body)
    if not lines:
        return [_line(depth, *head)]
    return [_line(depth, *head) + " {", *lines, _INDENT * depth + "}"]


def _protocols(protocols: tuple[str, str | None]) -> list[str]:
    return [p for p in protocols if p is not None]


def _serverTLS(depth: int, tls: ServerTLS | None) -> list[str]:
    if tls is None:
        return [_line(depth, "tls", "off")]
    body = [_line(depth + 1, "protocols", *_protocols(tls.protocols))]
    if tls.ciphers:
        body.append(_line(depth + 1, "ciphers", *tls.ciphers.split(":")))
    if tls.clientCA:
        body.append(_line(depth + 1, "client_ca", tls.clientCA))
    return _block(depth, ["tls", tls.cert, tls.key], body)


def _clientTLS(depth: int, tls: ClientTLS) -> list[str]:
    inner = depth + 1
    body = []
    if tls.rootCAs:
        body.append(_line(inner, "root_ca", *tls.rootCAs))
    if tls.cert:
        body.append(_line(inner, "cert", tls.cert))
    if tls.key:
        body.append(_line(inner, "key", tls.key))
    body.append(_line(inner, "protocols", *_protocols(tls.protocols)))
    if tls.ciphers:
        body.append(_line(inner, "ciphers", *tls.ciphers.split(":")))
    if tls.curves:
        body.append(_line(inner, "curves", *tls.curves))
    if tls.serverName:
        body.append(_line(inner, "server_name", tls.serverName))
    body.append(_line(inner, "insecure_skip_verify", formatBool(tls.insecureSkipVerify)))
    return [_line(depth, "tls_client") + " {", *body, _INDENT * depth + "}"]


def _auth(auth: DownstreamAuth) -> list[object]:
    if auth.mechanism in ("plain", "login"):
        return [auth.mechanism, auth.username, "****"]
    return [auth.mechanism]


def _targetBody(depth: int, target: Target) -> list[str]:
    lines = [
        _line(depth, "targets", *target.endpoints),
        _line(depth, "hostname", target.hostname),
        _line(depth, "debug", formatBool(target.debug)),
        *_clientTLS(depth, target.tlsClient),
        _line(depth, "attempt_starttls", formatBool(target.attemptStartTLS)),
        _line(depth, "require_tls", formatBool(target.requireTLS)),
        _line(depth, "auth", *_auth(target.auth)),
        _line(depth, "connect_timeout", formatDuration(target.connectTimeout)),
        _line(depth, "command_timeout", formatDuration(target.commandTimeout)),
        _line(depth, "submission_timeout", formatDuration(target.submissionTimeout)),
        _line(depth, "data_timeout", formatDuration(target.dataTimeout)),
    ]
    if target.protocol == "lmtp":
        lines.append(_line(depth, "lmtp_split", target.lmtpSplit))
    lines.append(_line(depth, "backoff", formatDuration(target.backoff)))
    lines.append(_line(depth, "reuse_connections", formatBool(target.reuseConnections)))
    if target.reuseConnections:
        lines.append(_line(depth, "reuse_idle_time", formatDuration(target.reuseIdleTime)))
        lines.append(_line(depth, "reuse_time_limit", formatDuration(target.reuseTimeLimit)))
    lines.append(_line(depth, "forward_client_info", target.forwardClientInfo))
    lines.append(_line(depth, "chunking", formatBool(target.chunking)))
    return lines


def _isNamed(config: Config, target: Target) -> bool:
    """
    Whether C{target} is a named target, maybe with the C{auth forward}
    its listener implies.
    """
    forward = DownstreamAuth(mechanism="forward")
    return any(
        named.name == target.name and target in (named, attrs.evolve(named, auth=forward))
        for named in config.targets
    )


def _decision(depth: int, config: Config, decision: Decision) -> list[str]:
    """
    C{deliver_to} or C{reject}.
    """
    if isinstance(decision, Reject):
        return [_line(depth, "reject", decision.code, decision.enhanced, decision.text)]
    if _isNamed(config, decision):
        return [_line(depth, "deliver_to", "&" + decision.name)]
    return _block(depth, ["deliver_to", decision.protocol], _targetBody(depth + 1, decision))


def _rules(name: str, rules: Iterable[tuple[str, _V]]) -> list[tuple[list[object], _V]]:
    """
    Rules in order, those next to each other with the same decision
    grouped into one C{name RULE... { }} head, as they were written.
    """
    groups: list[tuple[list[object], _V]] = []
    for key, value in rules:
        if groups and groups[-1][1] is value:
            groups[-1][0].append(key)
        else:
            groups.append(([name, key], value))
    return groups


def _handling(depth: int, config: Config, handling: Handling) -> list[str]:
    """
    A sender's handling: a decision, or destination blocks and their default.
    """
    if not isinstance(handling, Destinations):
        return _decision(depth, config, handling)
    lines: list[str] = []
    for head, decision in _rules("destination", handling.rules):
        lines += _block(depth, head, _decision(depth + 1, config, decision))
    return lines + _block(
        depth, ["default_destination"], _decision(depth + 1, config, handling.default)
    )


def _delivery(config: Config, delivery: Target | Routing) -> list[str]:
    if isinstance(delivery, Target):
        return _decision(1, config, delivery)
    lines: list[str] = []
    for head, handling in _rules("source", delivery.sources):
        lines += _block(1, head, _handling(2, config, handling))
    return lines + _handling(1, config, delivery.default)


def _listener(config: Config, listener: Listener) -> list[str]:
    body = _delivery(config, listener.deliverTo)
    for endpoint in listener.endpoints:
        body.append(_line(1, "endpoint", endpoint))
    auth = listener.auth
    body += [
        _line(1, "allow", *listener.allow),
        _line(1, "auth", auth.mode, *([auth.usersFile] if auth.usersFile else [])),
        _line(1, "require_tls", formatBool(listener.requireTLS)),
        *_serverTLS(1, listener.tls),
        _line(1, "max_message_size", formatSize(listener.maxMessageSize)),
        _line(1, "max_recipients", listener.maxRecipients),
        _line(1, "max_command_length", listener.maxCommandLength),
        _line(1, "max_connections", listener.maxConnections),
        _line(1, "max_connections_per_ip", listener.maxConnectionsPerIP),
        _line(1, "limit_exceptions", *(listener.limitExceptions or ["none"])),
        _line(1, "rate_limit_window", formatDuration(listener.rateLimitWindow)),
        _line(1, "max_connection_rate", listener.maxConnectionRate),
        _line(1, "max_message_rate", listener.maxMessageRate),
        _line(1, "max_recipient_rate", listener.maxRecipientRate),
        _line(1, "max_errors", listener.maxErrors),
        _line(1, "max_auth_failures", listener.maxAuthFailures),
        _line(1, "read_timeout", formatDuration(listener.readTimeout)),
        _line(1, "data_timeout", formatDuration(listener.dataTimeout)),
        _line(1, "proxy_timeout", formatDuration(listener.proxyTimeout)),
        _line(1, "max_hops", listener.maxHops),
    ]
    if listener.maxLineLength is not None:
        body.append(_line(1, "max_line_length", listener.maxLineLength))
    if listener.proxyProtocol:
        body.append(_line(1, "proxy_protocol", *listener.proxyProtocol))
    body += [
        _line(1, "bare_lf", listener.bareLF),
        _line(1, "reuse_port", formatBool(listener.reusePort)),
    ]
    return _block(0, [listener.kind, *listener.addresses], body)


def _environment(names: tuple[tuple[str, bool], ...]) -> list[str]:
    """
    Comment lines naming the environment variables the configuration read
    (their values may be secrets: only whether each was set).
    """
    if not names:
        return []
    read = ", ".join(name if isSet else f"{name} (unset)" for name, isSet in names)
    return [f"# environment variables read: {read}"]


def show(config: Config) -> str:
    """
    C{config} in the configuration language, defaults filled in and
    passwords masked.
    """
    lines = [
        f"# effective configuration of {config.source}",
        *_environment(config.environment),
        _line(0, "hostname", config.hostname),
        _line(0, "debug", formatBool(config.debug)),
        *_serverTLS(0, config.tls),
        *_clientTLS(0, config.tlsClient),
    ]
    if config.metrics is not None:
        lines.append(_line(0, "metrics", config.metrics))
    lines.append(_line(0, "shutdown_timeout", formatDuration(config.shutdownTimeout)))
    lines.append(_line(0, "probe_interval", formatDuration(config.probeInterval)))
    for target in config.targets:
        lines.append("")
        lines += _block(0, [f"target.{target.protocol}", target.name], _targetBody(1, target))
    for listener in config.listeners:
        lines.append("")
        lines += _listener(config, listener)
    return "\n".join(lines) + "\n"
