"""
The target blocks (C{target.smtp NAME}, C{target.lmtp NAME}, and the
block of an inline C{deliver_to}) with their C{tls_client} and C{auth}
directives, built into L{Target}s that take the global defaults.

Passwords become L{Secret}s and never appear in a message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

from smtprelay.reading import readText
from .directives import (
    Context,
    Directive,
    addresses,
    arguments,
    choice,
    colonList,
    duration,
    flag,
    hostname,
    protocols,
    readBlock,
    timeout,
    word,
    words,
)
from .lexer import Node
from .model import (
    Address,
    ClientInfo,
    ClientTLS,
    DownstreamAuth,
    LMTPSplit,
    Secret,
    Target,
    TargetProtocol,
)

TARGET_KINDS = tuple(f"target.{protocol}" for protocol in get_args(TargetProtocol))

PASSWORD_MECHANISMS = ("plain", "login")
"""The C{auth} mechanisms of a target that take C{USER PASSWORD}."""


def passwordFile(password: str) -> str | None:
    """
    The file a password argument names (C{file:PATH}), or L{None} when the
    password is written inline or taken from C{{env:...}}.
    """
    return password[len("file:") :] if password.startswith("file:") else None


def _password(text: str) -> Secret:
    """
    A password written inline (or taken from C{{env:...}}), or read from
    the first line of the file named by C{file:PATH}.
    """
    path = passwordFile(text)
    if path is not None:
        text = readText(path).partition("\n")[0]
        if not text:
            raise ValueError(f"{path}: empty password file")
    elif not text:
        raise ValueError("empty password (is its environment variable set?)")
    return Secret(text)


def clientTLS(node: Node, ctx: Context) -> ClientTLS:
    """
    A C{tls_client { ... }} block, in a target or at the top level.
    """
    if node.args:
        raise ValueError("takes no arguments, only a { ... } block")
    values, seen = readBlock(node.children, CLIENT_TLS, ctx)
    if ("cert" in values) != ("key" in values):
        ctx.error(seen.get("cert") or seen["key"], "tls_client: cert and key go together")
    return ClientTLS(origin=node.where(), **values)


def _targetAuth(node: Node, ctx: Context) -> DownstreamAuth:
    # The arguments may hold a password: no message repeats them.
    usage = "off, plain USER PASSWORD, login USER PASSWORD, forward or external"
    args = arguments(node, usage, 1, 3)
    if len(args) == 1 and args[0] in ("off", "forward", "external"):
        return DownstreamAuth(mechanism=args[0])  # type: ignore[arg-type]  # args[0] is one of the Literal's words, checked above
    if len(args) == 3 and args[0] in PASSWORD_MECHANISMS:
        if not args[1]:
            raise ValueError(f"{args[0]}: empty user name")
        return DownstreamAuth(
            mechanism=args[0],  # type: ignore[arg-type]  # args[0] is one of the Literal's words, checked above
            username=args[1],
            password=_password(args[2]),
        )
    raise ValueError(f"expected {usage}")


CLIENT_TLS = {
    "root_ca": Directive("rootCAs", words),
    "cert": Directive("cert", word),
    "key": Directive("key", word),
    "protocols": Directive("protocols", protocols),
    "ciphers": Directive("ciphers", colonList),
    "curves": Directive("curves", words),
    "server_name": Directive("serverName", word),
    "insecure_skip_verify": Directive("insecureSkipVerify", flag),
}

TARGET = {
    "targets": Directive("endpoints", addresses),
    "debug": Directive("debug", flag),
    "tls_client": Directive("tlsClient", clientTLS),
    "attempt_starttls": Directive("attemptStartTLS", flag),
    "require_tls": Directive("requireTLS", flag),
    "auth": Directive("auth", _targetAuth),
    "hostname": Directive("hostname", hostname),
    "connect_timeout": Directive("connectTimeout", timeout),
    "command_timeout": Directive("commandTimeout", timeout),
    "submission_timeout": Directive("submissionTimeout", timeout),
    "data_timeout": Directive("dataTimeout", timeout),
    "lmtp_split": Directive("lmtpSplit", choice(*get_args(LMTPSplit))),
    "backoff": Directive("backoff", duration),
    "reuse_connections": Directive("reuseConnections", flag),
    "reuse_idle_time": Directive("reuseIdleTime", timeout),
    "reuse_time_limit": Directive("reuseTimeLimit", timeout),
    "forward_client_info": Directive("forwardClientInfo", choice(*get_args(ClientInfo))),
    "chunking": Directive("chunking", flag),
}


def target(
    name: str, protocol: str, inline: Sequence[Address], node: Node, ctx: Context
) -> Target | None:
    """
    Build a target from the directives in C{node}'s block; C{inline} are
    the addresses written on the C{deliver_to} line.
    """
    values, seen = readBlock(node.children, TARGET, ctx)
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


def namedTarget(node: Node, ctx: Context, named: dict[str, Target | None]) -> None:
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
    named[name] = target(name, node.name.split(".")[1], (), node, ctx)
