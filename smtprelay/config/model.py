"""
The configuration tree: frozen, typed values with the defaults of docs/configuration.md.

The parser (L{smtprelay.config.parser}) builds these from a file; tests and
the C{--listen}/C{--target} quick start build them directly.  Durations are
seconds as C{float}, sizes are bytes as C{int}.  Nothing here does I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, Union

import attrs

from smtprelay.interfaces import ListenerKind
from smtprelay.net.address import Address, IPNetwork

TargetProtocol = Literal["smtp", "lmtp"]
"""What a target speaks (C{target.smtp}, C{target.lmtp}, C{deliver_to smtp|lmtp})."""

LMTPSplit = Literal["one_rcpt", "tempfail"]
"""The words of C{lmtp_split}."""

ClientInfo = Literal["off", "xforward", "xclient"]
"""The words of C{forward_client_info}."""

BareLF = Literal["reject", "normalize"]
"""The words of C{bare_lf}."""

LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)


@attrs.frozen(repr=False)
class Secret:
    """
    A password or other secret: its C{repr} and C{str} are always C{****}.
    Use L{Secret.reveal} at the one place the value goes on the wire.
    """

    _value: str = attrs.field(eq=True)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('****')"

    def __str__(self) -> str:
        return "****"


@attrs.frozen
class ServerTLS:
    """
    Server TLS (the C{tls} directive): certificate chain and key, and options.

    @ivar origin: C{FILE:LINE} of the directive, for messages about its
        files (not part of equality).
    """

    cert: str
    key: str
    protocols: tuple[str, str | None] = ("tls1.2", None)
    ciphers: str | None = None
    clientCA: str | None = None
    origin: str = attrs.field(default="", eq=False)


@attrs.frozen
class ClientTLS:
    """
    Client TLS (the C{tls_client} block).

    @ivar origin: C{FILE:LINE} of the block, for messages about its files
        (not part of equality).
    """

    rootCAs: tuple[str, ...] = ()
    cert: str | None = None
    key: str | None = None
    protocols: tuple[str, str | None] = ("tls1.2", None)
    ciphers: str | None = None
    curves: tuple[str, ...] = ()
    serverName: str | None = None
    insecureSkipVerify: bool = False
    origin: str = attrs.field(default="", eq=False)


@attrs.frozen
class DownstreamAuth:
    """
    Downstream authentication of a target: C{off}, C{plain U P}, C{login U P},
    C{forward} (the client's own credentials) or C{external}.
    """

    mechanism: Literal["off", "plain", "login", "forward", "external"] = "off"
    username: str | None = None
    password: Secret | None = None


@attrs.frozen
class Target:
    """
    A downstream: an ordered list of endpoints speaking SMTP or LMTP, and how
    to talk to them (the target directives).  C{name} is the C{target.smtp NAME} or a
    generated name for inline C{deliver_to}.
    """

    name: str
    protocol: TargetProtocol
    endpoints: tuple[Address, ...]
    hostname: str = "localhost"
    debug: bool = False
    tlsClient: ClientTLS = ClientTLS()
    attemptStartTLS: bool = True
    requireTLS: bool = False
    auth: DownstreamAuth = DownstreamAuth()
    connectTimeout: float = 300.0
    commandTimeout: float = 300.0
    submissionTimeout: float = 720.0
    dataTimeout: float = 180.0
    lmtpSplit: LMTPSplit = "one_rcpt"
    backoff: float = 30.0
    reuseConnections: bool = True
    reuseIdleTime: float = 2.0
    reuseTimeLimit: float = 300.0
    forwardClientInfo: ClientInfo = "off"
    chunking: bool = True


@attrs.frozen
class Reject:
    """
    C{reject [CODE [ENHANCED [TEXT]]]} in a routing block (maddy's defaults).
    """

    code: int = 554
    enhanced: str = "5.7.0"
    text: str = "Message rejected due to a local policy"


Decision = Union[Target, Reject]
"""What a routing rule does with a transaction or a recipient."""


@attrs.frozen
class Destinations:
    """
    C{destination RULE... { ... }} blocks and their C{default_destination}:
    each recipient goes where its address's rule, else its domain's rule,
    else the default says.

    @ivar rules: (rule, decision) in file order; a rule is a lower-case
        domain in A-labels or a lower-case C{local@domain}.
    """

    rules: tuple[tuple[str, Decision], ...]
    default: Decision


Handling = Union[Target, Reject, Destinations]
"""What a sender's transactions get: one target, a rejection, or routing by
recipient."""


@attrs.frozen
class Routing:
    """
    A listener's routing blocks: C{source RULE... { ... }} by the
    sender's address or domain, else C{default} (C{default_source}, or the
    listener's own C{deliver_to}/C{destination}/C{reject} directives).
    """

    sources: tuple[tuple[str, Handling], ...]
    default: Handling

    def targets(self) -> tuple[Target, ...]:
        """
        Every target a transaction may go to, each once, in file order.
        """
        found: list[Target] = []
        handlings = [h for _, h in self.sources] + [self.default]
        for handling in handlings:
            decisions = (
                [d for _, d in handling.rules] + [handling.default]
                if isinstance(handling, Destinations)
                else [handling]
            )
            for decision in decisions:
                if isinstance(decision, Target) and decision not in found:
                    found.append(decision)
        return tuple(found)


@attrs.frozen
class ListenerAuth:
    """
    Inbound AUTH of a listener: C{off}, C{forward} or C{users FILE}.

    @ivar origin: C{FILE:LINE} of the directive, for messages about the
        users file (not part of equality).
    """

    mode: Literal["off", "forward", "users"] = "off"
    usersFile: str | None = None
    origin: str = attrs.field(default="", eq=False)


@attrs.frozen
class Listener:
    """
    One C{smtp}/C{submission}/C{lmtp} block: where to listen, what to accept
    and where to deliver (the listener directives).

    @ivar deliverTo: the one target of every transaction, or the routing
        blocks that choose one per transaction.

    @ivar tls: server TLS for this listener (the global C{tls} unless
        overridden or C{tls off}), or L{None}.
    @ivar endpoints: extra Twisted server endpoint strings (C{systemd:...}).
    @ivar maxLineLength: the longest body line accepted, CRLF included,
        or L{None} to forward lines of any length intact.
    @ivar limitExceptions: clients exempt from C{max_connections_per_ip}
        and the rate limits (the C{allow} networks unless configured, as
        Postfix's C{smtpd_client_event_limit_exceptions} defaults to
        C{$mynetworks}).
    @ivar rateLimitWindow: the window of the rate limits (Postfix's
        C{anvil_rate_time_unit}).
    @ivar maxConnectionRate: new connections per client address and
        window (0: no limit).
    @ivar maxMessageRate: C{MAIL} commands per user or client address and
        window (0: no limit).
    @ivar maxRecipientRate: C{RCPT} commands per user or client address
        and window (0: no limit).
    """

    kind: ListenerKind
    addresses: tuple[Address, ...]
    deliverTo: Target | Routing
    endpoints: tuple[str, ...] = ()
    allow: tuple[IPNetwork, ...] = LOOPBACK
    auth: ListenerAuth = ListenerAuth()
    requireTLS: bool = False
    tls: ServerTLS | None = None
    maxMessageSize: int = 32 * 1024 * 1024
    maxRecipients: int = 1000
    maxLineLength: int | None = None
    maxCommandLength: int = 2048
    maxConnections: int = 500
    maxConnectionsPerIP: int = 50
    maxErrors: int = 20
    maxAuthFailures: int = 3
    readTimeout: float = 300.0
    dataTimeout: float = 600.0
    proxyTimeout: float = 5.0
    maxHops: int = 50
    proxyProtocol: tuple[IPNetwork, ...] = ()
    bareLF: BareLF = "reject"
    reusePort: bool = False
    limitExceptions: tuple[IPNetwork, ...] = attrs.field(
        default=attrs.Factory(lambda self: self.allow, takes_self=True)
    )
    rateLimitWindow: float = 60.0
    maxConnectionRate: int = 0
    maxMessageRate: int = 0
    maxRecipientRate: int = 0

    @property
    def lmtp(self) -> bool:
        return self.kind == "lmtp"

    @property
    def targets(self) -> tuple[Target, ...]:
        """
        Every target this listener's transactions may go to.
        """
        if isinstance(self.deliverTo, Routing):
            return self.deliverTo.targets()
        return (self.deliverTo,)


@attrs.frozen
class Config:
    """
    The whole effective configuration.

    @ivar probeInterval: seconds between readiness probes of the targets
        (served as C{/readyz} on the C{metrics} listener).
    @ivar source: the file it was read from (or C{"<command line>"}).
    @ivar environment: the environment variables its C{{env:NAME}} read,
        sorted by name, each with whether it was set (not part of equality:
        the same settings from literal words are the same configuration).
    """

    hostname: str
    listeners: tuple[Listener, ...]
    targets: tuple[Target, ...] = ()
    debug: bool = False
    tls: ServerTLS | None = None
    tlsClient: ClientTLS = ClientTLS()
    metrics: Address | None = None
    shutdownTimeout: float = 30.0
    probeInterval: float = 30.0
    source: str = "<command line>"
    environment: tuple[tuple[str, bool], ...] = attrs.field(default=(), eq=False)
