"""
The boundaries between the engines.

The inbound engine (L{smtprelay.inbound.session}) owns the client connection and talks
to one L{IRelayHandler} per client session; the relay core
(L{smtprelay.relay.session}) implements it.  Everything the handler may know about
the client is in L{ClientSession}, which the server keeps up to date.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, Mapping, Sequence, get_args

import attrs
from zope.interface import Attribute, Interface

from smtprelay.protocol.replies import Reply

if TYPE_CHECKING:
    # Only named in annotations: the contracts between the rooms need no reactor.
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IPushProducer

Params = Mapping[str, "str | None"]
"""ESMTP parameters of MAIL/RCPT: upper-cased keyword → value (None if bare)."""


ListenerKind = Literal["smtp", "submission", "lmtp"]
"""What a listener speaks: the configuration's listener blocks, the inbound
session's policy and the metrics' C{kind} label."""

LISTENER_KINDS: tuple[ListenerKind, ...] = get_args(ListenerKind)


@attrs.frozen
class TLSInfo:
    """
    What a TLS connection negotiated, for C{Received:} headers and logs.

    @ivar bits: the cipher's secret and algorithm bits, when known.
    @ivar verified: the peer's certificate was verified (a downstream's:
        a chain to a trusted root and the target's name).
    """

    version: str
    cipher: str
    bits: tuple[int, int] | None = None
    verified: bool = False

    @property
    def description(self) -> str:
        """
        C{TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)}, as
        Postfix writes it.
        """
        bits = f" ({self.bits[0]}/{self.bits[1]} bits)" if self.bits else ""
        return f"{self.version} with cipher {self.cipher}{bits}"


@attrs.define
class ClientSession:
    """
    The state of one client connection that a handler may read.  The server
    writes it; handlers treat it as read-only.

    @ivar id: a short unique session id, shown in replies and logs.
    @ivar protocol: C{"smtp"} or C{"lmtp"} (what the listener speaks).
    @ivar clientHost: the client's IP address (after PROXY protocol), or
        C{""} on unix sockets.
    @ivar heloName: the EHLO/HELO/LHLO argument, once given.
    @ivar esmtp: the client greeted with EHLO/LHLO (not HELO).
    @ivar tls: negotiated TLS, or None.
    @ivar user: the authenticated user name, or None.
    @ivar smtputf8: the current transaction declared SMTPUTF8.
    """

    id: str
    protocol: Literal["smtp", "lmtp"]
    clientHost: str
    clientPort: int = 0
    heloName: str | None = None
    esmtp: bool = False
    tls: TLSInfo | None = None
    user: str | None = None
    smtputf8: bool = False

    @property
    def withProtocol(self) -> str:
        """
        The C{with} clause of a C{Received:} header (RFC 3848).
        """
        if self.protocol == "lmtp":
            return "LMTP" + ("S" if self.tls else "") + ("A" if self.user else "")
        if not self.esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.tls else "") + ("A" if self.user else "")


class IRelayHandler(Interface):
    """
    One client session's view of the relay.  The server calls these in
    protocol order, one at a time: it never calls a method while a Deferred
    returned by a previous call is pending.  Every returned reply goes to the
    client as it is (the server adds nothing but the session id).

    Local policy (syntax, relay access, size, TLS/AUTH requirements, limits)
    is checked by the server before the handler is asked.
    """

    session = Attribute("The L{ClientSession} this handler serves.")

    def authenticate(mechanism: str, username: str, password: str) -> Deferred[Reply]:
        """
        Check credentials given with AUTH PLAIN/LOGIN (only called over TLS or
        a unix socket).  Fire with 235 to accept, anything else to refuse.
        """

    def mail(sender: bytes, params: Params) -> Deferred[Reply]:
        """
        Start a transaction.  C{sender} is the reverse-path without brackets
        (C{b""} for the null sender).
        """

    def rcpt(recipient: bytes, params: Params) -> Deferred[Reply]:
        """
        Add a recipient (forward-path without brackets).
        """

    def data(producer: IPushProducer) -> Deferred[Reply]:
        """
        The client sent DATA (or its first BDAT chunk) with at least one
        accepted recipient.  Fire with 354 to receive the body, anything
        else to refuse.  Until the
        transaction ends, the handler may pause and resume C{producer} (the
        client's socket) for back-pressure.
        """

    def dataChunk(chunk: bytes) -> None:
        """
        Unstuffed message bytes, in order, as they arrive; lines end in CRLF.
        The end-of-data line is not included.
        """

    def endData() -> Deferred[Sequence[Reply]]:
        """
        The client's real end-of-data arrived and the message passed local
        checks.  Fire with the final reply: one for SMTP, one per accepted
        recipient in RCPT order for LMTP.
        """

    def abortData(reply: Reply) -> None:
        """
        The body was refused locally (C{reply} tells why: bare LF, too big,
        too many hops) or abandoned by the client between BDAT chunks.  The
        downstream must not receive the end-of-data.
        """

    def reset() -> None:
        """
        RSET, or a new MAIL after a finished transaction: forget the
        transaction.  Never called while the body is being received.
        """

    def close() -> None:
        """
        The client connection is gone (QUIT, drop or timeout).  Abort a
        transaction whose end-of-data was not received; finish and log one
        whose end-of-data was.
        """


@attrs.frozen(repr=False)
class Credentials:
    """
    A user name and password handed to a downstream (C{auth forward}).  The
    password never appears in C{repr}.
    """

    username: str
    password: str

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='****')"


class DownstreamError(Exception):
    """
    A downstream attempt or session failed.

    @ivar reply: what the client should be told (already mapped for
        it: a downstream's own reply, or one of the relay's 4xx replies).
    @ivar reason: a log-safe description of the cause (no secrets).
    @ivar received: the LMTP end-of-data replies that arrived before the
        failure, in RCPT order: those recipients have their verdict.
    """

    def __init__(self, reply: Reply, reason: str = "", received: Sequence[Reply] = ()) -> None:
        super().__init__(reason or reply.text)
        self.reply = reply
        self.reason = reason or reply.text
        self.received = tuple(received)


class IDownstream(Interface):
    """
    One established downstream session (connected, greeted, EHLO/LHLO done,
    TLS and AUTH done when configured), made by L{smtprelay.outbound.handshake}.

    Methods that return Deferreds must be called one at a time in protocol
    order.  They fire with the downstream's reply (sanitizing is the
    caller's job) or, when a reply is locally decided (a parameter the
    downstream cannot take, such as C{BODY=8BITMIME}), with that reply and nothing sent.
    They fail with L{DownstreamError} when the connection breaks, times out
    or the peer misbehaves; the connection is then closed.

    It is also the body's C{IConsumer}: C{write} takes unstuffed message
    bytes (CRLF lines) and dot-stuffs them; C{registerProducer} links the
    client's socket for back-pressure (paused while the downstream's write
    buffer is above its high-water mark, or when the body stalls).
    """

    lmtp = Attribute("True if this session speaks LMTP.")
    capabilities = Attribute("Mapping of upper-cased EHLO keyword → argument string.")
    tls = Attribute("L{TLSInfo} of the downstream connection, or None.")
    peer = Attribute("C{host[ip]:port} or the unix path, for logs and metrics.")
    policy = Attribute("The L{smtprelay.outbound.policy.ClientPolicy} of its target.")
    address = Attribute("The endpoint it is connected to.")
    connectedAt = Attribute("When it was connected (clock seconds).")
    idle = Attribute(
        "True while it is open, between transactions, with nothing outstanding:"
        " it could serve another transaction as it is."
    )

    def mail(sender: bytes, params: Params, client: ClientSession | None = None) -> Deferred[Reply]:
        """
        MAIL FROM with the client's parameters the downstream advertises;
        before it, the identity of C{client} when the target forwards it
        per transaction (C{forward_client_info xforward}).
        """

    def rcpt(recipient: bytes, params: Params) -> Deferred[Reply]:
        """
        RCPT TO with the client's parameters the downstream advertises.
        """

    def data() -> Deferred[Reply]:
        """
        DATA; fires with the downstream's 354 (or its refusal), or at once
        with a local 354 when the body goes as BDAT chunks.
        """

    def write(data: bytes) -> None:
        """
        Body bytes (unstuffed); stuffed and sent.
        """

    def registerProducer(producer: IPushProducer, streaming: bool) -> None:
        """
        The client's socket, paused/resumed for back-pressure.
        """

    def unregisterProducer() -> None:
        """
        Forget the producer.
        """

    def endData() -> Deferred[Sequence[Reply]]:
        """
        Send the end-of-data dot (or the C{LAST} chunk); fire with one reply
        (SMTP) or one per accepted recipient in RCPT order (LMTP).  An LMTP session that
        fails after some of its replies fails with a L{DownstreamError}
        whose C{received} holds them.
        """

    def rset() -> Deferred[Reply]:
        """
        RSET: the session can take a new transaction.
        """

    def quit() -> None:
        """
        Send QUIT and close.
        """

    def abort() -> None:
        """
        Close the connection at once, never sending an end-of-data.
        """
