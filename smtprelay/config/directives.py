"""
The machinery every block of the configuration shares: a table from
directive name to a small converter (L{Directive}), L{readBlock} that
applies one to a block's nodes, the argument readers and the converters of
common values, and L{Context}, which collects the errors.

A converter takes a node and the context and returns the model value or
raises L{ValueError} with a message fit to follow C{FILE:LINE: directive:};
a check that spans directives reports to L{Context.error} instead.  All
errors are raised together as one L{ConfigError}, in file order.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs

from smtprelay.net.address import parseAddress
from .lexer import ConfigError, Node, fromEnvironment
from .model import Address, ClientTLS, ServerTLS
from .values import (
    parseBool,
    parseCount,
    parseDuration,
    parseNetwork,
    parseProtocols,
    parseSize,
    toALabel,
)

_LIST_SEPARATORS = re.compile(r"[\s,]+")


@attrs.define
class Context:
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

    def check(self, nodes: Sequence[Node], source: str) -> None:
        """
        Raise the errors reported so far, if any, in file order: C{source}
        first, then the files C{nodes} import in the order they are
        imported, each by line.

        @raise ConfigError: every error reported.
        """
        if self.errors:
            order = _fileOrder(nodes, {source: 0})
            raise ConfigError.at(
                sorted(self.errors, key=lambda e: (order.get(e[0], len(order)), e[1]))
            )


def _fileOrder(nodes: Iterable[Node], order: dict[str, int]) -> dict[str, int]:
    for node in nodes:
        order.setdefault(node.file, len(order))
        _fileOrder(node.children, order)
    return order


Convert = Callable[[Node, Context], Any]


@attrs.frozen
class Directive:
    """
    How one directive of a block is read: the model field it sets and the
    converter from its node to the value.
    """

    field: str
    convert: Convert
    repeatable: bool = False


def readBlock(
    nodes: Iterable[Node], table: Mapping[str, Directive], ctx: Context
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


def arguments(node: Node, usage: str, least: int, most: int | None = None) -> tuple[str, ...]:
    """
    The arguments of a directive that takes no block and between C{least}
    and C{most} (unbounded if L{None}) arguments.
    """
    if node.block:
        raise ValueError(f"takes no block (expected {usage})")
    if len(node.args) < least or (most is not None and len(node.args) > most):
        raise ValueError(f"expected {usage}")
    return node.args


def items(args: Sequence[str], rawArgs: Sequence[str]) -> list[str]:
    """
    The items of a list written as C{args}: an argument taken from
    C{{env:...}} (as C{rawArgs} shows) holds any number of items separated
    by spaces or commas, as a list in one environment variable does
    (C{SMTPRELAY_TARGETS="tcp://a:25,tcp://b:25"}); other arguments are one
    item each.
    """
    found: list[str] = []
    for arg, raw in zip(args, rawArgs):
        found.extend(filter(None, _LIST_SEPARATORS.split(arg)) if fromEnvironment(raw) else [arg])
    return found


def listOf(node: Node, usage: str) -> list[str]:
    """
    The items of a directive that takes no block and a list of at least
    one item (see L{items}).
    """
    if node.block:
        raise ValueError(f"takes no block (expected {usage})")
    found = items(node.args, node.rawArgs)
    if not found:
        raise ValueError(f"expected {usage}")
    return found


def one(node: Node, usage: str) -> str:
    return arguments(node, usage, 1, 1)[0]


def word(node: Node, ctx: Context) -> str:
    value = one(node, "one value")
    if not value:
        raise ValueError("empty value")
    return value


def words(node: Node, ctx: Context) -> tuple[str, ...]:
    return arguments(node, "one or more values", 1)


def colonList(node: Node, ctx: Context) -> str:
    return ":".join(words(node, ctx))


def flag(node: Node, ctx: Context) -> bool:
    found = arguments(node, "yes or no", 0, 1)
    return parseBool(found[0]) if found else True


def duration(node: Node, ctx: Context) -> float:
    return parseDuration("".join(arguments(node, "a duration such as 30s or 5m", 1)))


def timeout(node: Node, ctx: Context) -> float:
    seconds = duration(node, ctx)
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


def size(node: Node, ctx: Context) -> int:
    value = parseSize(one(node, "a size such as 32M"))
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def count(minimum: int, why: str = "") -> Convert:
    def convert(node: Node, ctx: Context) -> int:
        number = parseCount(one(node, "a number"))
        if number < minimum:
            raise ValueError(f"must be at least {minimum}" + (f" ({why})" if why else ""))
        return number

    return convert


def choice(*choices: str) -> Convert:
    def convert(node: Node, ctx: Context) -> str:
        usage = " or ".join(choices)
        value = one(node, usage)
        if value not in choices:
            raise ValueError(f'expected {usage}, not "{value}"')
        return value

    return convert


def addresses(node: Node, ctx: Context) -> tuple[Address, ...]:
    return tuple(parseAddress(item) for item in listOf(node, "one or more ADDRESSes"))


def networks(node: Node, ctx: Context) -> tuple[Any, ...]:
    return tuple(parseNetwork(item) for item in listOf(node, "one or more networks (CIDR)"))


def networksOrNone(node: Node, ctx: Context) -> tuple[Any, ...]:
    if node.args == ("none",):
        return ()
    return networks(node, ctx)


def protocols(node: Node, ctx: Context) -> tuple[str, str | None]:
    if node.block:
        raise ValueError("takes no block")
    return parseProtocols(node.args)


def hostname(node: Node, ctx: Context) -> str:
    return toALabel(one(node, "NAME"))
