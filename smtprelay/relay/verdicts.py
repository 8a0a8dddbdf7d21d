"""
The downstream's final replies → the client's.

An LMTP client gets one reply per accepted recipient, an SMTP client one.
An LMTP downstream's per-recipient replies reach an LMTP client as they
are; for an SMTP client (C{lmtp_split tempfail}) they agree when their
outcomes have one class (texts differ: C{"<a@x> Saved"}, C{"delivered"}),
and the first then speaks for all; otherwise the client gets
C{451 4.3.0} and tries again later.
"""

from __future__ import annotations

from collections.abc import Sequence

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
