"""
Idle downstream connections, kept between client sessions.

A connection the relay is done with waits idle for the next transaction
(L{Pool.release}), as Postfix's connection cache does: a new client
session then skips connect, greeting, EHLO, STARTTLS and AUTH.  Only
connections that are between transactions are kept, each at most
C{reuse_idle_time} and for at most C{reuse_time_limit} after it was
opened, and at most L{MAX_IDLE} per target.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from smtprelay.interfaces import IDownstream

MAX_IDLE = 16
"""The most idle connections kept per target."""


@attrs.frozen
class ReusePolicy:
    """
    Whether and how long a target's connections are kept for reuse.

    @ivar enabled: keep them at all (C{reuse_connections}).
    @ivar idleTime: the longest one waits idle (C{reuse_idle_time}).
    @ivar timeLimit: the longest one serves, from its connect
        (C{reuse_time_limit}).
    """

    enabled: bool = True
    idleTime: float = 2.0
    timeLimit: float = 300.0


class Pool:
    """
    The idle connections of one target.

    @param policy: how long connections are kept; None keeps none (a
        target whose connections carry a client's identity).
    """

    def __init__(self, policy: ReusePolicy | None, clock: IReactorTime) -> None:
        self._policy = policy if policy is not None and policy.enabled else None
        self._clock = clock
        self._idle: list[tuple[IDownstream, IDelayedCall]] = []
        self._closed = False

    def __bool__(self) -> bool:
        """
        Whether any connection waits.
        """
        return bool(self._idle)

    def release(self, session: IDownstream) -> None:
        """
        The relay is done with C{session}: keep it idle for another client
        session if it can serve one as it is, QUIT it otherwise.
        """
        policy = self._policy
        if (
            self._closed
            or policy is None
            or not session.idle
            or self._clock.seconds() - session.connectedAt >= policy.timeLimit
            or len(self._idle) >= MAX_IDLE
        ):
            session.quit()
            return
        expiry = self._clock.callLater(policy.idleTime, self._expire, session)
        self._idle.append((session, expiry))

    def take(self, address: object) -> IDownstream | None:
        """
        The newest idle connection to C{address}, if one is still usable;
        one that is not is closed on the way.
        """
        for i in range(len(self._idle) - 1, -1, -1):
            session, expiry = self._idle[i]
            if session.address != address:
                continue
            del self._idle[i]
            expiry.cancel()
            if session.idle:
                return session
            session.abort()
        return None

    def close(self) -> None:
        """
        Shutting down: QUIT the idle connections and keep no more.
        """
        self._closed = True
        idle, self._idle = self._idle, []
        for session, expiry in idle:
            expiry.cancel()
            session.quit()

    def _expire(self, session: IDownstream) -> None:
        self._idle = [(s, e) for s, e in self._idle if s is not session]
        session.quit()
