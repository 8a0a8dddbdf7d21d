"""
Where a listener's mail goes: its C{deliver_to}, or its routing blocks
(C{source} and C{destination} rules with their defaults, each ending in one
C{deliver_to} or C{reject}), built into a L{Target} or a L{Routing}.

One message goes to one target, never several; a rule routed twice is an
error.  Inline targets are built by L{smtprelay.config.targets.target}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar, get_args

import attrs

from smtprelay.net.address import parseAddress
from smtprelay.protocol.addresses import ruleKey
from .directives import Context, arguments, items
from .lexer import Node
from .model import (
    Address,
    Decision,
    Destinations,
    Handling,
    Reject,
    Routing,
    Target,
    TargetProtocol,
)
from .targets import target
from .values import isNumber

ROUTING = ("deliver_to", "reject", "destination", "default_destination", "source", "default_source")
"""The listener directives that say where mail goes (docs/configuration.md, "Routing directives")."""

_Resolve = Callable[[Node], "Target | None"]
"""A C{deliver_to} node → its target (L{None} after reporting an error)."""

_V = TypeVar("_V")


@attrs.frozen
class _Inline:
    """
    C{deliver_to smtp|lmtp ADDRESS... [{ ... }]}, built into a target once
    the listener's name for it is known.
    """

    protocol: str
    endpoints: tuple[Address, ...]
    node: Node


def _deliverTo(node: Node, ctx: Context) -> str | _Inline:
    usage = "&NAME or smtp|lmtp ADDRESS... [{ ... }]"
    if not node.args:
        raise ValueError(f"expected {usage}")
    first = node.args[0]
    if first.startswith("&"):
        if len(node.args) != 1 or node.block or first == "&":
            raise ValueError("expected &NAME alone")
        return first[1:]
    if first not in get_args(TargetProtocol):
        raise ValueError(f'expected {usage}, not "{first}"')
    found = items(node.args[1:], node.rawArgs[1:])
    return _Inline(first, tuple(parseAddress(item) for item in found), node)


def _reject(node: Node, ctx: Context) -> Reject:
    """
    C{reject [CODE [ENHANCED [TEXT]]]}, maddy's syntax and defaults.
    """
    args = arguments(node, "[CODE [ENHANCED [TEXT]]]", 0, 3)
    default = Reject()
    code = int(args[0]) if args and isNumber(args[0]) else 0
    if args and not 400 <= code <= 599:
        raise ValueError(f'"{args[0]}" is not a 4xx or 5xx reply code')
    if len(args) < 2:
        return Reject(code or default.code, f"{code // 100}.7.0" if code else default.enhanced)
    enhanced = args[1]
    parts = enhanced.split(".")
    if not (len(parts) == 3 and all(isNumber(p) and len(p) <= 3 for p in parts)):
        raise ValueError(f'"{enhanced}" is not an enhanced status code (as in 5.7.1)')
    if parts[0] != str(code // 100):
        raise ValueError(f"{enhanced} does not match the class of {code}")
    text = args[2] if len(args) == 3 else default.text
    if not text.strip() or not text.isprintable() or not text.isascii():
        raise ValueError("the text must be printable ASCII")
    return Reject(code, enhanced, text)
def _decision(nodes: Sequence[Node], where: Node, ctx: Context, resolve: _Resolve) -> Decision | None:
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


def _rules(
    nodes: Sequence[Node], name: str, ctx: Context, inside: Callable[[Node], _V]
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


def _single(nodes: Sequence[Node], name: str, ctx: Context) -> Node | None:
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


def _handling(nodes: Sequence[Node], where: Node, ctx: Context, resolve: _Resolve) -> Handling | None:
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


def delivery(
    kind: str, number: int, nodes: Sequence[Node], where: Node, ctx: Context,
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
            written = _deliverTo(node, ctx)
        except ValueError as e:
            ctx.error(node, f"deliver_to: {e}")
            return None
        if isinstance(written, str):
            if written not in named:
                ctx.error(node, f'deliver_to: unknown target "&{written}"')
            return named.get(written)
        inline += 1
        name = f"{kind}-listener-{number}" + (f"-route-{inline}" if routed else "")
        return target(name, written.protocol, written.endpoints, written.node, ctx)

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
