"""
What a relayed transaction leaves behind: the C{Received:} header it adds
to the message, and its log lines and metrics.

The header is Postfix-like (RFC 5321 §4.4), with a comment on the TLS the
message leaves by.  Each transaction logs one line (docs/operations.md),
and one more per recipient when the downstream gave each its own reply
(LMTP); the lines are emitted on the next reactor turn, after the client's
reply has been sent, so that formatting them is not the client's wait.
"""

from __future__ import annotations

import email.utils
import functools
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from smtprelay.interfaces import ClientSession, IDownstream
from smtprelay.observe.logs import logFormatted
from smtprelay.observe.metrics import IMetrics
from smtprelay.protocol.replies import Reply

CLIENT_GONE = "client connection closed during DATA"
"""The cause logged for a body the client did not finish."""

NAMESPACE = "smtprelay.relay.session.RelaySession"
"""The log namespace of the transaction and per-recipient lines."""


def receivedHeader(
    session: ClientSession, hostname: str, downstream: IDownstream, recipients: Sequence[bytes], now: float
) -> bytes:
    """
    The C{Received:} header prepended to a message from C{session}, relayed
    by C{hostname} over C{downstream}; C{for <rcpt>} when it has one
    recipient.
    """
    helo = session.heloName or "unknown"
    address = f"[{session.clientHost}]" if session.clientHost else "unix socket"
    lines = [f"Received: from {helo} ({address})"]
    if session.tls is not None:
        lines.append(f"\t(using {session.tls.description})")
    lines.append(f"\tby {hostname} (smtprelay) with {session.withProtocol} id {session.id}")
    if downstream.tls is not None:
        lines.append(f"\t(relayed using {downstream.tls.description}, {trust(downstream)})")
    date = _headerDate(int(now))
    if len(recipients) == 1:
        forward = recipients[0].decode("utf-8", "replace")
        lines.append(f"\tfor <{forward}>; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


@functools.lru_cache(maxsize=4)
def _headerDate(second: int) -> str:
    """
    The C{Received:} header's date (RFC 5322, local time), made once per
    second: C{formatdate} costs more than the rest of the header.
    """
    return email.utils.formatdate(second, localtime=True)


def trust(downstream: IDownstream | None) -> str:
    """
    The downstream connection's TLS in one word: C{verified} (a
    certificate chain to a trusted root, for the target's name),
    C{untrusted} (encrypted, the peer not verified) or C{no}.
    """
    if downstream is None or downstream.tls is None:
        return "no"
    return "verified" if downstream.tls.verified else "untrusted"


def outcome(final: Sequence[Reply]) -> tuple[str, Reply]:
    """
    Postfix's word for the outcome of replies to one transaction (deferred
    if any is temporary, else bounced if any is permanent, else sent) and
    the first reply that shows it.
    """
    for reply in final:
        if reply.transient:
            return "deferred", reply
    for reply in final:
        if reply.permanent:
            return "bounced", reply
    return "sent", final[0]


@attrs.frozen
class Transaction:
    """
    One transaction as its log line tells it.

    @ivar target: the target's name, or C{none}.
    @ivar started: when MAIL arrived (clock seconds).
    """

    session: ClientSession
    sender: bytes | None
    recipients: int
    size: int
    target: str
    started: float


class TransactionLog:
    """
    Where transactions are logged and counted.
    """

    def __init__(self, clock: IReactorTime, metrics: IMetrics) -> None:
        self._clock = clock
        self._metrics = metrics
        # An instance's logger keeps the namespace the transaction lines
        # have always had (JSON logs show it); a class attribute would take
        # this class's name.
        self._log = Logger(namespace=NAMESPACE)

    def record(
        self,
        transaction: Transaction,
        status: str,
        reply: Reply | str,
        downstream: IDownstream | None = None,
        endOfDataSeconds: float | None = None,
        recipients: Sequence[tuple[bytes, Reply]] = (),
    ) -> None:
        """
        The one log event of C{transaction}, then one per recipient in
        C{recipients}, and the metrics.  The events are taken now and
        emitted on the next reactor turn.

        @param reply: the reply that shows C{status}, or the cause of an
            abort that no reply tells.
        @param recipients: each recipient with its own final reply, when
            the downstream gave one per recipient (LMTP).
        """
        session = transaction.session
        self._metrics.transaction(status, transaction.size, transaction.target, endOfDataSeconds)
        fields = dict(
            session=session.id,
            client=session.clientHost,
            helo=session.heloName,
            sender=(transaction.sender or b"").decode("utf-8", "replace"),
            to=transaction.recipients,
            size=transaction.size,
            relay=downstream.peer if downstream is not None else "none",
            tls=trust(downstream),
            delay=self._clock.seconds() - transaction.started,
            status=status,
            reply=reply if isinstance(reply, str) else reply.summary,
            transaction=True,
        )
        self._clock.callLater(0, self._emit, fields, recipients)

    def _emit(self, fields: dict[str, Any], recipients: Sequence[tuple[bytes, Reply]]) -> None:
        f = fields
        logFormatted(
            self._log,
            f"{f['session']}: from=<{f['sender']}> to={f['to']} size={f['size']} relay={f['relay']} "
            f"tls={f['tls']} delay={f['delay']:.3f} status={f['status']} reply={f['reply']}",
            **fields,
        )
        for recipient, reply in recipients:
            to = recipient.decode("utf-8", "replace")
            status = outcome([reply])[0]
            logFormatted(
                self._log,
                f"{f['session']}: to=<{to}> relay={f['relay']} status={status} reply={reply.summary}",
                delivery=True,
                session=f["session"],
                recipient=to,
                relay=f["relay"],
                status=status,
                reply=reply.summary,
            )

