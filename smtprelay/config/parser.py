"""
The directives of docs/configuration.md: a node tree from L{smtprelay.config.lexer} checked
and turned into the frozen L{Config} of L{smtprelay.config.model}.

Each block kind (top level, listener, target, C{tls}, C{tls_client}) is a
table from directive name to a small converter.  Unknown and duplicate
directives, wrong argument counts and bad values are all collected and raised
together as one L{ConfigError}, one C{FILE:LINE: message} each, in file
order.  Passwords become L{Secret}s and never appear in a message.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import attrs
import idna

from smtprelay.net.address import parseAddress
from smtprelay.protocol.addresses import ruleKey
from smtprelay.reading import readText
from .lexer import ConfigError, Node, parseTree, readTree
from .model import (
    Address,
    ClientTLS,
    Config,
    Decision,
    Destinations,
    DownstreamAuth,
    Handling,
    Listener,
    ListenerAuth,
    Reject,
    Routing,
    Secret,
    ServerTLS,
    Target,
)
from .values import (
    parseBool,
    parseDuration,
    parseNetwork,
    parseProtocols,
    parseSize,
)

LISTENER_KINDS = ("smtp", "submission", "lmtp")
TARGET_KINDS = ("target.smtp", "target.lmtp")

_LIST_SEPARATORS = re.compile(r"[\s,]+")


@attrs.define
class _Context:
    """
    What converters need besides their node: the global defaults of
    targets and listeners, and the list errors go to.
    """

    errors: list[tuple[str, int, str]] = attrs.Factory(list)
    hostname: str = "localhost"
    debug: bool = False
    tls: ServerTLS | None = None
    tlsClient: ClientTLS = attrs.Factory(ClientTLS)

    def error(self, node: Node, message: str) -> None:
        self.errors.append((node.file, node.line, message))


_Convert = Callable[[Node, _Context], Any]


@attrs.frozen
class _Directive:
    """
    How one directive of a block is read: the model field it sets and the
    converter from its node to the value.
    """

    field: str
    convert: _Convert
    repeatable: bool = False


def _readBlock(
    nodes: Iterable[Node], table: Mapping[str, _Directive], ctx: _Context
) -> tuple[dict[str, Any], dict[str, Node]]:
    """
    Convert the directives of one block, reporting unknown and duplicate
    ones and conversion errors to C{ctx}.

    @return: the values by model field (a list for repeatable directives),
        and the first node of each directive seen, by name.
    """
    values: dict[str, Any] = {}
    seen: dict[str, Node] = {}
    for node in nodes:
        directive = table.get(node.name)
        if directive is None:
            message = f'unknown directive "{node.name}"'
            close = difflib.get_close_matches(node.name, table, n=1)
            if close:
                message += f' (did you mean "{close[0]}"?)'
            ctx.error(node, message)
            continue
        first = seen.setdefault(node.name, node)
        if first is not node and not directive.repeatable:
            ctx.error(node, f"{node.name}: duplicate directive (first at {first.where()})")
            continue
        try:
            value = directive.convert(node, ctx)
        except ValueError as e:
            ctx.error(node, f"{node.name}: {e}")
            continue
        if directive.repeatable:
            values.setdefault(directive.field, []).append(value)
        else:
            values[directive.field] = value
    return values, seen


def _args(node: Node, usage: str, least: int, most: int | None = None) -> tuple[str, ...]:
    """
    The arguments of a directive that takes no block and between C{least}
    and C{most} (unbounded if L{None}) arguments.
    """
    if node.block:
        raise ValueError(f"takes no block (expected {usage})")
    if len(node.args) < least or (most is not None and len(node.args) > most):
        raise ValueError(f"expected {usage}")
    return node.args


def _items(args: Sequence[str], rawArgs: Sequence[str]) -> list[str]:
    """
    The items of a list written as C{args}: an argument taken from
    C{{env:...}} (as C{rawArgs} shows) holds any number of items separated
    by spaces or commas, as a list in one environment variable does
    (C{SMTPRELAY_TARGETS="tcp://a:25,tcp://b:25"}); other arguments are one
    item each.
    """
    items: list[str] = []
    for arg, raw in zip(args, rawArgs):
        items.extend(filter(None, _LIST_SEPARATORS.split(arg)) if "{env:" in raw else [arg])
    return items


def _list(node: Node, usage: str) -> list[str]:
    """
    The items of a directive that takes no block and a list of at least
    one item (see L{_items}).
    """
    if node.block:
        raise ValueError(f"takes no block (expected {usage})")
    items = _items(node.args, node.rawArgs)
    if not items:
        raise ValueError(f"expected {usage}")
    return items


def _one(node: Node, usage: str) -> str:
    return _args(node, usage, 1, 1)[0]


def _word(node: Node, ctx: _Context) -> str:
    value = _one(node, "one value")
    if not value:
        raise ValueError("empty value")
    return value


def _words(node: Node, ctx: _Context) -> tuple[str, ...]:
    return _args(node, "one or more values", 1)


def _colonList(node: Node, ctx: _Context) -> str:
    return ":".join(_words(node, ctx))


def _flag(node: Node, ctx: _Context) -> bool:
    args = _args(node, "yes or no", 0, 1)
    return parseBool(args[0]) if args else True


def _duration(node: Node, ctx: _Context) -> float:
    return parseDuration("".join(_args(node, "a duration such as 30s or 5m", 1)))


def _timeout(node: Node, ctx: _Context) -> float:
    seconds = _duration(node, ctx)
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


def _size(node: Node, ctx: _Context) -> int:
    size = parseSize(_one(node, "a size such as 32M"))
    if size <= 0:
        raise ValueError("must be greater than 0")
    return size


def _count(minimum: int, why: str = "") -> _Convert:
    def convert(node: Node, ctx: _Context) -> int:
        text = _one(node, "a number")
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f'"{text}" is not a number')
        number = int(text)
        if number < minimum:
            raise ValueError(f"must be at least {minimum}" + (f" ({why})" if why else ""))
        return number

    return convert


def _choice(*choices: str) -> _Convert:
    def convert(node: Node, ctx: _Context) -> str:
        usage = " or ".join(choices)
        value = _one(node, usage)
        if value not in choices:
            raise ValueError(f'expected {usage}, not "{value}"')
        return value

    return convert


def _addresses(node: Node, ctx: _Context) -> tuple[Address, ...]:
    return tuple(parseAddress(item) for item in _list(node, "one or more ADDRESSes"))


def _networks(node: Node, ctx: _Context) -> tuple[Any, ...]:
    return tuple(parseNetwork(item) for item in _list(node, "one or more networks (CIDR)"))


def _networksOrNone(node: Node, ctx: _Context) -> tuple[Any, ...]:
    if node.args == ("none",):
        return ()
    return _networks(node, ctx)


def _protocols(node: Node, ctx: _Context) -> tuple[str, str | None]:
    if node.block:
        raise ValueError("takes no block")
    return parseProtocols(node.args)


def toALabel(name: str) -> str:
    """
    A host name as an IDNA A-label (C{bücher.example} → C{xn--bcher-kva.example}).

    @raise ValueError: C{name} is not a valid host name.
    """
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except idna.IDNAError as e:
        raise ValueError(f'"{name}" is not a valid host name ({e})') from None


def _hostname(node: Node, ctx: _Context) -> str:
    return toALabel(_one(node, "NAME"))


def _metrics(node: Node, ctx: _Context) -> Address:
    address = parseAddress(_one(node, "ADDRESS"))
    if address.scheme != "tcp":
        raise ValueError("must be a tcp://HOST:PORT address")
    return address


def _keep(node: Node, ctx: _Context) -> Node:
    return node


def _password(text: str) -> Secret:
    """
    A password written inline (or taken from C{{env:...}}), or read from
    the first line of the file named by C{file:PATH}.
    """
    if text.startswith("file:"):
        path = text[len("file:") :]
        text = readText(path).partition("\n")[0]
        if not text:
            raise ValueError(f"{path}: empty password file")
    elif not text:
        raise ValueError("empty password (is its environment variable set?)")
    return Secret(text)


def _serverTLS(node: Node, ctx: _Context) -> ServerTLS | None:
    if node.args == ("off",) and not node.block:
        return None
    if len(node.args) != 2:
        raise ValueError("expected CERT KEY [{ ... }] or off")
    values, _ = _readBlock(node.children, _SERVER_TLS, ctx)
    return ServerTLS(cert=node.args[0], key=node.args[1], origin=node.where(), **values)


def _clientTLS(node: Node, ctx: _Context) -> ClientTLS:
    if node.args:
        raise ValueError("takes no arguments, only a { ... } block")
    values, seen = _readBlock(node.children, _CLIENT_TLS, ctx)
    if ("cert" in values) != ("key" in values):
        ctx.error(seen.get("cert") or seen["key"], "tls_client: cert and key go together")
    return ClientTLS(origin=node.where(), **values)


def _listenerAuth(node: Node, ctx: _Context) -> ListenerAuth:
    args = _args(node, "off, forward or users FILE", 1, 2)
    if args in (("off",), ("forward",)):
        return ListenerAuth(mode=args[0])
    if len(args) == 2 and args[0] == "users" and args[1]:
        return ListenerAuth(mode="users", usersFile=args[1], origin=node.where())
    raise ValueError("expected off, forward or users FILE")


def _targetAuth(node: Node, ctx: _Context) -> DownstreamAuth:
    # The arguments may hold a password: no message repeats them.
    usage = "off, plain USER PASSWORD, login USER PASSWORD, forward or external"
    args = _args(node, usage, 1, 3)
    if len(args) == 1 and args[0] in ("off", "forward", "external"):
        return DownstreamAuth(mechanism=args[0])  # type: ignore[arg-type]  # args[0] is one of the Literal's words, checked above
    if len(args) == 3 and args[0] in ("plain", "login"):
        if not args[1]:
            raise ValueError(f"{args[0]}: empty user name")
        return DownstreamAuth(
            mechanism=args[0],  # type: ignore[arg-type]  # args[0] is one of the Literal's words, checked above
            username=args[1],
            password=_password(args[2]),
        )
    raise ValueError(f"expected {usage}")


def _endpoint(node: Node, ctx: _Context) -> str:
    description = _one(node, 'a Twisted endpoint string such as "systemd:domain=INET:index=0"')
    if not description.strip() or ":" not in description:
        raise ValueError(
            f'"{description}" is not an endpoint string (as in systemd:domain=INET:index=0)'
        )
    return description


@attrs.frozen
class _Inline:
    """
    C{deliver_to smtp|lmtp ADDRESS... [{ ... }]}, built into a target once
    the listener's name for it is known.
    """

    protocol: str
    endpoints: tuple[Address, ...]
    node: Node


def _deliverTo(node: Node, ctx: _Context) -> str | _Inline:
    usage = "&NAME or smtp|lmtp ADDRESS... [{ ... }]"
    if not node.args:
        raise ValueError(f"expected {usage}")
    first = node.args[0]
    if first.startswith("&"):
        if len(node.args) != 1 or node.block or first == "&":
            raise ValueError("expected &NAME alone")
        return first[1:]
    if first not in ("smtp", "lmtp"):
        raise ValueError(f'expected {usage}, not "{first}"')
    addresses = _items(node.args[1:], node.rawArgs[1:])
    return _Inline(first, tuple(parseAddress(item) for item in addresses), node)


_SERVER_TLS = {
    "protocols": _Directive("protocols", _protocols),
    "ciphers": _Directive("ciphers", _colonList),
    "client_ca": _Directive("clientCA", _word),
}

_CLIENT_TLS = {
    "root_ca": _Directive("rootCAs", _words),
    "cert": _Directive("cert", _word),
    "key": _Directive("key", _word),
    "protocols": _Directive("protocols", _protocols),
    "ciphers": _Directive("ciphers", _colonList),
    "curves": _Directive("curves", _words),
    "server_name": _Directive("serverName", _word),
    "insecure_skip_verify": _Directive("insecureSkipVerify", _flag),
}

_TARGET = {
    "targets": _Directive("endpoints", _addresses),
    "debug": _Directive("debug", _flag),
    "tls_client": _Directive("tlsClient", _clientTLS),
    "attempt_starttls": _Directive("attemptStartTLS", _flag),
    "require_tls": _Directive("requireTLS", _flag),
    "auth": _Directive("auth", _targetAuth),
    "hostname": _Directive("hostname", _hostname),
    "connect_timeout": _Directive("connectTimeout", _timeout),
    "command_timeout": _Directive("commandTimeout", _timeout),
    "submission_timeout": _Directive("submissionTimeout", _timeout),
    "data_timeout": _Directive("dataTimeout", _timeout),
    "lmtp_split": _Directive("lmtpSplit", _choice("one_rcpt", "tempfail")),
    "backoff": _Directive("backoff", _duration),
    "reuse_connections": _Directive("reuseConnections", _flag),
    "reuse_idle_time": _Directive("reuseIdleTime", _timeout),
    "reuse_time_limit": _Directive("reuseTimeLimit", _timeout),
    "forward_client_info": _Directive("forwardClientInfo", _choice("off", "xforward", "xclient")),
    "chunking": _Directive("chunking", _flag),
}

_LISTENER = {
    "allow": _Directive("allow", _networks),
    "auth": _Directive("auth", _listenerAuth),
    "require_tls": _Directive("requireTLS", _flag),
    "tls": _Directive("tls", _serverTLS),
    "max_message_size": _Directive("maxMessageSize", _size),
    "max_recipients": _Directive("maxRecipients", _count(100, "RFC 5321")),
    "max_line_length": _Directive("maxLineLength", _count(1000, "RFC 5321")),
    "max_command_length": _Directive("maxCommandLength", _count(512, "RFC 5321")),
    "max_connections": _Directive("maxConnections", _count(1)),
    "max_connections_per_ip": _Directive("maxConnectionsPerIP", _count(1)),
    "limit_exceptions": _Directive("limitExceptions", _networksOrNone),
    "rate_limit_window": _Directive("rateLimitWindow", _timeout),
    "max_connection_rate": _Directive("maxConnectionRate", _count(0)),
    "max_message_rate": _Directive("maxMessageRate", _count(0)),
    "max_recipient_rate": _Directive("maxRecipientRate", _count(0)),
    "max_errors": _Directive("maxErrors", _count(1)),
    "max_auth_failures": _Directive("maxAuthFailures", _count(1)),
    "read_timeout": _Directive("readTimeout", _timeout),
    "data_timeout": _Directive("dataTimeout", _timeout),
    "proxy_timeout": _Directive("proxyTimeout", _timeout),
    "max_hops": _Directive("maxHops", _count(1)),
    "proxy_protocol": _Directive("proxyProtocol", _networks),
    "bare_lf": _Directive("bareLF", _choice("reject", "normalize")),
    "endpoint": _Directive("endpoints", _endpoint, repeatable=True),
    "reuse_port": _Directive("reusePort", _flag),
}

_TOP = {
    "hostname": _Directive("hostname", _hostname),
    "debug": _Directive("debug", _flag),
    "tls": _Directive("tls", _serverTLS),
    "tls_client": _Directive("tlsClient", _clientTLS),
    "metrics": _Directive("metrics", _metrics),
    "shutdown_timeout": _Directive("shutdownTimeout", _duration),
    "probe_interval": _Directive("probeInterval", _timeout),
    **{kind: _Directive(kind, _keep, repeatable=True) for kind in LISTENER_KINDS + TARGET_KINDS},
}


def _target(
    name: str, protocol: str, inline: Sequence[Address], node: Node, ctx: _Context
) -> Target | None:
    """
    Build a target from the directives in C{node}'s block; C{inline} are
    the addresses written on the C{deliver_to} line.
    """
    values, seen = _readBlock(node.children, _TARGET, ctx)
    endpoints = tuple(values.pop("endpoints", ())) + tuple(inline)
    if protocol != "lmtp" and "lmtpSplit" in values:
        ctx.error(seen["lmtp_split"], "lmtp_split: only LMTP targets split recipients")
        del values["lmtpSplit"]
    fields: dict[str, Any] = {
        "hostname": ctx.hostname,
        "debug": ctx.debug,
        "tlsClient": ctx.tlsClient,
        "attemptStartTLS": protocol == "smtp",
        **values,
    }
    auth: DownstreamAuth = fields.get("auth", DownstreamAuth())
    if auth.mechanism == "external" and fields["tlsClient"].cert is None:
        ctx.error(
            seen["auth"],
            "auth: external needs a client certificate (tls_client { cert ... key ... })",
        )
    if not endpoints:
        if "targets" not in seen:
            ctx.error(node, f"{node.name}: no endpoints (add targets ADDRESS...)")
        return None
    return Target(name=name, protocol=protocol, endpoints=endpoints, **fields)  # type: ignore[arg-type]  # fields: each directive's value, of its field's type


def _namedTarget(node: Node, ctx: _Context, named: dict[str, Target | None]) -> None:
    """
    Add the C{target.smtp NAME} or C{target.lmtp NAME} block C{node} to
    C{named} (as L{None} when it has errors).
    """
    if len(node.args) != 1 or not node.args[0]:
        ctx.error(node, f"{node.name}: expected NAME {{ ... }}")
        return
    name = node.args[0]
    if name in named:
        ctx.error(node, f'{node.name}: a target named "{name}" already exists')
        return
    named[name] = _target(name, node.name.split(".")[1], (), node, ctx)


ROUTING = ("deliver_to", "reject", "destination", "default_destination", "source", "default_source")
"""The listener directives that say where mail goes (docs/configuration.md, "Routing directives")."""

DIRECTIVES: Mapping[str, Collection[str]] = {
    "top level": _TOP.keys(),
    "listener": _LISTENER.keys(),
    "routing": ROUTING,
    "target": _TARGET.keys(),
    "tls": _SERVER_TLS.keys(),
    "tls_client": _CLIENT_TLS.keys(),
}
"""The directives the parser knows, by the kind of block they go in: the
very tables it dispatches on (the reference in docs/configuration.md is
checked against them)."""

_Resolve = Callable[[Node], "Target | None"]
"""A C{deliver_to} node → its target (L{None} after reporting an error)."""


def _reject(node: Node, ctx: _Context) -> Reject:
    """
    C{reject [CODE [ENHANCED [TEXT]]]}, maddy's syntax and defaults.
    """
    args = _args(node, "[CODE [ENHANCED [TEXT]]]", 0, 3)
    default = Reject()
    code = int(args[0]) if args and args[0].isascii() and args[0].isdigit() else 0
    if args and not 400 <= code <= 599:
        raise ValueError(f'"{args[0]}" is not a 4xx or 5xx reply code')
    if len(args) < 2:
        return Reject(code or default.code, f"{code // 100}.7.0" if code else default.enhanced)
    enhanced = args[1]
    parts = enhanced.split(".")
    if not (len(parts) == 3 and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts)):
        raise ValueError(f'"{enhanced}" is not an enhanced status code (as in 5.7.1)')
    if parts[0] != str(code // 100):
        raise ValueError(f"{enhanced} does not match the class of {code}")
    text = args[2] if len(args) == 3 else default.text
    if not text.strip() or not text.isprintable() or not text.isascii():
        raise ValueError("the text must be printable ASCII")
    return Reject(code, enhanced, text)


def _decision(nodes: Sequence[Node], where: Node, ctx: _Context, resolve: _Resolve) -> Decision | None:
    """
    The inside of a routing block: one C{deliver_to} or one C{reject}.
    One message goes to one target, never several.
    """
    found: list[Decision | None] = []
    for node in nodes:
        if node.name == "deliver_to":
            found.append(resolve(node))
        elif node.name == "reject":
            try:
                found.append(_reject(node, ctx))
            except ValueError as e:
                ctx.error(node, f"reject: {e}")
                found.append(None)
        else:
            ctx.error(node, f'{node.name}: not allowed here (expected deliver_to or reject)')
            found.append(None)
    if len(found) > 1:
        ctx.error(nodes[1], f"{nodes[1].name}: one deliver_to or reject per block (a message goes to one target)")
        return None
    if not found:
        ctx.error(where, f"{where.name}: expected deliver_to or reject")
        return None
    return found[0]


_V = TypeVar("_V")


def _rules(
    nodes: Sequence[Node], name: str, ctx: _Context, inside: Callable[[Node], _V]
) -> list[tuple[str, _V]]:
    """
    The rules of every C{name RULE... { ... }} block (C{source} or
    C{destination}) in C{nodes}, in order: (rule key, what C{inside} reads
    from the block).  A rule routed twice is an error.
    """
    seen: dict[str, Node] = {}
    rules: list[tuple[str, _V]] = []
    for node in nodes:
        if node.name != name:
            continue
        if not node.args or not node.block:
            ctx.error(node, f"{name}: expected DOMAIN|ADDRESS... {{ ... }}")
        value = inside(node)
        for arg in node.args:
            try:
                key = ruleKey(arg)
            except ValueError as e:
                ctx.error(node, f"{name}: {e}")
                continue
            if key in seen:
                ctx.error(node, f"{name}: {arg} is already routed (at {seen[key].where()})")
                continue
            seen[key] = node
            rules.append((key, value))
    return rules


def _single(nodes: Sequence[Node], name: str, ctx: _Context) -> Node | None:
    """
    The one C{default_source}/C{default_destination} block in C{nodes}.
    """
    found = [node for node in nodes if node.name == name]
    for node in found[1:]:
        ctx.error(node, f"{name}: duplicate directive (first at {found[0].where()})")
    for node in found[:1]:
        if node.args or not node.block:
            ctx.error(node, f"{name}: expected {name} {{ ... }}")
    return found[0] if found else None


def _handling(nodes: Sequence[Node], where: Node, ctx: _Context, resolve: _Resolve) -> Handling | None:
    """
    What one sender's mail gets: C{deliver_to}/C{reject}, or C{destination}
    blocks with their C{default_destination}.
    """
    if not any(node.name in ("destination", "default_destination") for node in nodes):
        return _decision(nodes, where, ctx, resolve)
    for node in nodes:
        if node.name not in ("destination", "default_destination"):
            ctx.error(node, f"{node.name}: not beside destination blocks "
                            "(put it in default_destination { ... })")
    rules = _rules(
        nodes, "destination", ctx, lambda node: _decision(node.children, node, ctx, resolve)
    )
    fallback = _single(nodes, "default_destination", ctx)
    if fallback is None:
        ctx.error(where, f"{where.name}: destination blocks need a default_destination "
                         "{ deliver_to ... } or { reject }")
        return None
    default = _decision(fallback.children, fallback, ctx, resolve)
    if default is None or any(decision is None for _, decision in rules):
        return None
    return Destinations(tuple(rules), default)  # type: ignore[arg-type]  # no rule's decision is None, checked above


def _delivery(
    kind: str, number: int, nodes: Sequence[Node], where: Node, ctx: _Context,
    named: Mapping[str, Target | None],
) -> Target | Routing | None:
    """
    A listener's C{deliver_to}, or its routing blocks: C{source}
    blocks, and C{default_source} or the listener's own directives for
    every other sender.  Inline targets are named after the listener, as
    in C{smtp-listener-1} (C{smtp-listener-1-route-2} in routing blocks).
    """
    routed = not (len(nodes) == 1 and nodes[0].name == "deliver_to")
    inline = 0

    def resolve(node: Node) -> Target | None:
        nonlocal inline
        try:
            delivery = _deliverTo(node, ctx)
        except ValueError as e:
            ctx.error(node, f"deliver_to: {e}")
            return None
        if isinstance(delivery, str):
            if delivery not in named:
                ctx.error(node, f'deliver_to: unknown target "&{delivery}"')
            return named.get(delivery)
        inline += 1
        name = f"{kind}-listener-{number}" + (f"-route-{inline}" if routed else "")
        return _target(name, delivery.protocol, delivery.endpoints, delivery.node, ctx)

    if not nodes:
        ctx.error(where, f"{kind}: listener needs deliver_to")
        return None
    if not routed:
        return resolve(nodes[0])
    sources = _rules(
        nodes, "source", ctx, lambda node: _handling(node.children, node, ctx, resolve)
    )
    defaultSource = _single(nodes, "default_source", ctx)
    others = [node for node in nodes if node.name not in ("source", "default_source")]
    default: Handling | None = None
    if defaultSource is not None:
        for node in others:
            ctx.error(node, f"{node.name}: not beside default_source (put it in default_source {{ ... }})")
        default = _handling(defaultSource.children, defaultSource, ctx, resolve)
    elif others:
        default = _handling(others, where, ctx, resolve)
    else:
        ctx.error(where, f"{kind}: source blocks need a default_source {{ ... }} "
                         "(or deliver_to or destination blocks for other senders)")
    if default is None or any(handling is None for _, handling in sources):
        return None
    return Routing(tuple(sources), default)  # type: ignore[arg-type]  # no source's handling is None, checked above


def _listener(
    kind: str, number: int, node: Node, ctx: _Context, named: Mapping[str, Target | None]
) -> Listener | None:
    """
    Build the C{number}th listener from C{node}, resolving C{deliver_to
    &NAME} in C{named} (where L{None} marks a target that exists but has
    errors).  An inline target is named after the listener's kind and
    number, as in C{smtp-listener-1}.
    """
    addresses = []
    items = _items(node.args, node.rawArgs)
    for item in items:
        try:
            addresses.append(parseAddress(item))
        except ValueError as e:
            ctx.error(node, f"{kind}: {e}")
    values, seen = _readBlock([n for n in node.children if n.name not in ROUTING], _LISTENER, ctx)
    endpoints = tuple(values.pop("endpoints", ()))
    if not items and not endpoints:
        ctx.error(node, f"{kind}: expected ADDRESS... {{ ... }} (or an endpoint directive)")
    routing = [n for n in node.children if n.name in ROUTING]
    target = _delivery(kind, number, routing, node, ctx, named)

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


def _fileOrder(nodes: Iterable[Node], order: dict[str, int]) -> dict[str, int]:
    for node in nodes:
        order.setdefault(node.file, len(order))
        _fileOrder(node.children, order)
    return order


def build(nodes: Sequence[Node], source: str) -> Config:
    """
    Check the top-level C{nodes} of a configuration read from C{source} and
    build the L{Config} they describe.

    @raise ConfigError: every problem found, in file order.
    """
    ctx = _Context()
    values, _ = _readBlock(nodes, _TOP, ctx)
    for kind in LISTENER_KINDS + TARGET_KINDS:
        values.pop(kind, None)
    ctx.hostname = values.setdefault("hostname", defaultHostname())
    ctx.debug = values.get("debug", False)
    ctx.tls = values.get("tls")
    ctx.tlsClient = values.get("tlsClient", ClientTLS())

    named: dict[str, Target | None] = {}
    for node in nodes:
        if node.name in TARGET_KINDS:
            _namedTarget(node, ctx, named)
    listeners = []
    listenerNodes = [node for node in nodes if node.name in LISTENER_KINDS]
    for number, node in enumerate(listenerNodes, 1):
        listener = _listener(node.name, number, node, ctx, named)
        if listener is not None:
            listeners.append(listener)
    if not listenerNodes:
        ctx.errors.append((source, 1, "no listeners (add an smtp, submission or lmtp block)"))

    if ctx.errors:
        order = _fileOrder(nodes, {source: 0})
        errors = sorted(ctx.errors, key=lambda e: (order.get(e[0], len(order)), e[1]))
        raise ConfigError([f"{file}:{line}: {message}" for file, line, message in errors])
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
