"""
The listener blocks (C{smtp}, C{submission}, C{lmtp}) with their C{tls}
and C{auth} directives, built into L{Listener}s: addresses or endpoint
strings, limits, and the delivery that L{smtprelay.config.routing} reads.

The checks that span a listener's directives live here: a submission
listener needs AUTH, C{auth forward} needs one target, TLS needs a
certificate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import get_args

import attrs

from smtprelay.net.address import parseAddress
from .directives import (
    Context,
    Directive,
    arguments,
    choice,
    colonList,
    count,
    flag,
    items,
    networks,
    networksOrNone,
    one,
    protocols,
    readBlock,
    size,
    timeout,
    word,
)
from .lexer import Node
from .model import (
    BareLF,
    DownstreamAuth,
    Listener,
    ListenerAuth,
    ListenerKind,
    Routing,
    ServerTLS,
    Target,
)
from .routing import ROUTING, delivery

LISTENER_KINDS: tuple[str, ...] = get_args(ListenerKind)


def serverTLS(node: Node, ctx: Context) -> ServerTLS | None:
    """
    C{tls CERT KEY [{ ... }]} or C{tls off}, in a listener or at the top
    level.
    """
    if node.args == ("off",) and not node.block:
        return None
    if len(node.args) != 2:
        raise ValueError("expected CERT KEY [{ ... }] or off")
    values, _ = readBlock(node.children, SERVER_TLS, ctx)
    return ServerTLS(cert=node.args[0], key=node.args[1], origin=node.where(), **values)


def _listenerAuth(node: Node, ctx: Context) -> ListenerAuth:
    args = arguments(node, "off, forward or users FILE", 1, 2)
    if args in (("off",), ("forward",)):
        return ListenerAuth(mode=args[0])
    if len(args) == 2 and args[0] == "users" and args[1]:
        return ListenerAuth(mode="users", usersFile=args[1], origin=node.where())
    raise ValueError("expected off, forward or users FILE")


def _endpoint(node: Node, ctx: Context) -> str:
    description = one(node, 'a Twisted endpoint string such as "systemd:domain=INET:index=0"')
    if not description.strip() or ":" not in description:
        raise ValueError(
            f'"{description}" is not an endpoint string (as in systemd:domain=INET:index=0)'
        )
    return description


SERVER_TLS = {
    "protocols": Directive("protocols", protocols),
    "ciphers": Directive("ciphers", colonList),
    "client_ca": Directive("clientCA", word),
}

LISTENER = {
    "allow": Directive("allow", networks),
    "auth": Directive("auth", _listenerAuth),
    "require_tls": Directive("requireTLS", flag),
    "tls": Directive("tls", serverTLS),
    "max_message_size": Directive("maxMessageSize", size),
    "max_recipients": Directive("maxRecipients", count(100, "RFC 5321")),
    "max_line_length": Directive("maxLineLength", count(1000, "RFC 5321")),
    "max_command_length": Directive("maxCommandLength", count(512, "RFC 5321")),
    "max_connections": Directive("maxConnections", count(1)),
    "max_connections_per_ip": Directive("maxConnectionsPerIP", count(1)),
    "limit_exceptions": Directive("limitExceptions", networksOrNone),
    "rate_limit_window": Directive("rateLimitWindow", timeout),
    "max_connection_rate": Directive("maxConnectionRate", count(0)),
    "max_message_rate": Directive("maxMessageRate", count(0)),
    "max_recipient_rate": Directive("maxRecipientRate", count(0)),
    "max_errors": Directive("maxErrors", count(1)),
    "max_auth_failures": Directive("maxAuthFailures", count(1)),
    "read_timeout": Directive("readTimeout", timeout),
    "data_timeout": Directive("dataTimeout", timeout),
    "proxy_timeout": Directive("proxyTimeout", timeout),
    "max_hops": Directive("maxHops", count(1)),
    "proxy_protocol": Directive("proxyProtocol", networks),
    "bare_lf": Directive("bareLF", choice(*get_args(BareLF))),
    "endpoint": Directive("endpoints", _endpoint, repeatable=True),
    "reuse_port": Directive("reusePort", flag),
}


def listener(
    kind: str, number: int, node: Node, ctx: Context, named: Mapping[str, Target | None]
) -> Listener | None:
    """
    Build the C{number}th listener from C{node}, resolving C{deliver_to
    &NAME} in C{named} (where L{None} marks a target that exists but has
    errors).  An inline target is named after the listener's kind and
    number, as in C{smtp-listener-1}.
    """
    addresses = []
    written = items(node.args, node.rawArgs)
    for item in written:
        try:
            addresses.append(parseAddress(item))
        except ValueError as e:
            ctx.error(node, f"{kind}: {e}")
    values, seen = readBlock([n for n in node.children if n.name not in ROUTING], LISTENER, ctx)
    endpoints = tuple(values.pop("endpoints", ()))
    if not written and not endpoints:
        ctx.error(node, f"{kind}: expected ADDRESS... {{ ... }} (or an endpoint directive)")
    routing = [n for n in node.children if n.name in ROUTING]
    target = delivery(kind, number, routing, node, ctx, named)

    auth: ListenerAuth = values.get("auth", ListenerAuth())
    if kind == "submission" and auth.mode == "off":
        ctx.error(
            seen.get("auth", node), "submission listener needs auth forward or auth users FILE"
        )
    if auth.mode == "forward" and isinstance(target, Routing):
        ctx.error(
            seen["auth"],
            "auth forward: needs one deliver_to target (AUTH comes before the envelope "
            "that routing blocks choose a target by)",
        )
    elif auth.mode == "forward" and isinstance(target, Target):
        if target.auth.mechanism == "off":
            target = attrs.evolve(target, auth=DownstreamAuth(mechanism="forward"))
        elif target.auth.mechanism != "forward":
            ctx.error(
                seen["auth"],
                f'auth forward: target "{target.name}" already uses auth {target.auth.mechanism}',
            )

    tls = values.pop("tls", ctx.tls)
    if tls is None:
        for address in addresses:
            if address.scheme == "tls":
                ctx.error(node, f"{kind}: {address} needs a certificate (tls CERT KEY)")
        if values.get("requireTLS"):
            ctx.error(seen["require_tls"], "require_tls: needs a certificate (tls CERT KEY)")
    if target is None:
        return None
    return Listener(
        kind=kind,  # type: ignore[arg-type]  # kind is the block's name, one of the Literal's words
        addresses=tuple(addresses),
        deliverTo=target,
        endpoints=endpoints,
        tls=tls,
        **values,
    )
