"""
The downstream's replies and failures → the client's.

A failure's reply is the relay's own (with the session id) or the
downstream's (sanitized).  An LMTP client gets one reply per accepted recipient, an SMTP client one.
An LMTP downstream's per-recipient replies reach an LMTP client as they
are; for an SMTP client (C{lmtp_split tempfail}) they agree when their
outcomes have one class (texts differ: C{"<a@x> Saved"}, C{"delivered"}),
and the first then speaks for all; otherwise the client gets
C{451 4.3.0} and tries again later.
"""

from __future__ import annotations

from collections.abc import Sequence

from smtprelay.interfaces import ClientSession
from smtprelay.protocol import replies
from smtprelay.protocol.parameters import finalReplies
from smtprelay.protocol.replies import Reply


def perRecipient(reply: Reply, clientLMTP: bool, accepted: int) -> list[Reply]:
    """
    C{reply} for every recipient that expects one.
    """
    return [reply] * finalReplies(clientLMTP, accepted)


def clientFinal(results: Sequence[Reply], clientLMTP: bool, accepted: int, sessionId: str) -> list[Reply]:
    """
    The client's final reply(ies) for the downstream's C{results}.

    @param accepted: how many recipients the downstream accepted.
    @param sessionId: shown in a local reply.
    """
    if clientLMTP:
        if len(results) == accepted:
            return list(results)
        return perRecipient(results[0], clientLMTP, accepted)
    first = results[0]
    if all(r.code // 100 == first.code // 100 for r in results):
        return [first]
    return [replies.LMTP_MIXED.withSession(sessionId)]


RELAY_REPLIES = frozenset(
    {
        replies.NO_DOWNSTREAM,
        replies.DOWNSTREAM_LOST,
        replies.DOWNSTREAM_DNS,
        replies.DOWNSTREAM_NO_TLS,
        replies.DOWNSTREAM_CONFUSED,
        replies.DOWNSTREAM_AUTH,
        replies.LOOP,
        replies.CONVERSION_REQUIRED,
        replies.UTF8_SENDER,
        replies.UTF8_RECIPIENT,
    }
)
"""The replies a L{smtprelay.interfaces.DownstreamError} carries that the
relay made, not the downstream."""


def failureReply(reply: Reply, session: ClientSession) -> Reply:
    """
    What the client is told of a downstream failure with C{reply}: the
    relay's own reply with the session id, or the downstream's sanitized.
    """
    if reply in RELAY_REPLIES:
        return reply.withSession(session.id)
    return reply.sanitized(utf8=session.smtputf8)


def authVerdict(reply: Reply, session: ClientSession) -> Reply:
    """
    What the client is told when C{auth forward} failed with C{reply}: the
    downstream's permanent verdict on its credentials, else a temporary
    failure (never C{535} for a downstream that gave no verdict).
    """
    if reply.permanent and reply not in RELAY_REPLIES:
        return reply.sanitized()
    return replies.AUTH_TEMPFAIL.withSession(session.id)
