"""
Rate limits of a listener, as Postfix's anvil keeps them: new connections
per client address, messages (C{MAIL}) and recipients (C{RCPT}) per client
address or, once it authenticated, per user, each in a time window.

L{RateCounter} counts events per key in fixed windows that start at a key's
first event and last C{rate_limit_window} (anvil's C{anvil_rate_time_unit}),
in memory and bounded: at most L{MAX_KEYS} keys, the least recently used
forgotten first.  L{ListenerRates} applies a listener's limits to a client
session and says what to refuse with (a L{Refusal} with its metric reason).  The counts are per process: several
processes (C{reuse_port}, replicas behind a load balancer) each count their
own share of a client's connections and mail.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

from smtprelay.inbound.policy import RateLimits
from smtprelay.interfaces import ClientSession
from smtprelay.protocol.replies import Refusal, reply

MAX_KEYS = 50_000
"""The most (event, client) pairs counted at once; about 200 bytes each."""


class RateCounter:
    """
    Events per key in fixed windows, in bounded memory.

    @param window: the length of a key's window, in seconds.
    @param clock: the time source.
    @param maxKeys: the most keys tracked; past it, the least recently
        counted key is forgotten (its count starts again at zero).
    """

    def __init__(self, window: float, clock: IReactorTime, maxKeys: int = MAX_KEYS) -> None:
        self._window = window
        self._clock = clock
        self._maxKeys = maxKeys
        self._counts: OrderedDict[tuple[str, str], tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def count(self, event: str, key: str) -> int:
        """
        Count one C{event} of C{key}; return how many there were in its
        current window, this one included.
        """
        now = self._clock.seconds()
        entry = (event, key)
        started, seen = self._counts.pop(entry, (now, 0))
        if now - started >= self._window:
            started, seen = now, 0
        self._counts[entry] = (started, seen + 1)
        while len(self._counts) > self._maxKeys:
            self._counts.popitem(last=False)
        return seen + 1


class ListenerRates:
    """
    One listener's L{RateLimits} (its C{max_connection_rate},
    C{max_message_rate} and C{max_recipient_rate}; 0: no limit).  Exempt clients and those on unix
    sockets are not limited.  Every attempt counts, refused ones included,
    as anvil counts them: a client that keeps trying stays refused until
    its window ends.

    @param exempt: whether a client address is exempt from limits (the
        listener's C{limit_exceptions}, by default its C{allow} networks, as
        Postfix exempts C{smtpd_client_event_limit_exceptions}).
    """

    def __init__(
        self,
        limits: RateLimits,
        clock: IReactorTime,
        exempt: Callable[[str], bool],
        maxKeys: int = MAX_KEYS,
    ) -> None:
        self._limits = limits
        self._exempt = exempt
        self._counter = RateCounter(limits.window, clock, maxKeys)

    def connection(self, session: ClientSession) -> Refusal | None:
        """
        A new connection: C{421 4.7.0} if its address made more than
        C{max_connection_rate} in the window.
        """
        host = session.clientHost
        if self._exceeds("connection", host, self._limits.connections, session):
            return Refusal(reply(421, "4.7.0", f"Error: too many connections from {host}"),
                           "rate_connections")
        return None

    def message(self, session: ClientSession) -> Refusal | None:
        """
        C{MAIL}: C{450 4.7.1} past C{max_message_rate} for the client's
        user, else its address.
        """
        who = _who(session)
        if self._exceeds("message", who, self._limits.messages, session):
            return Refusal(reply(450, "4.7.1", f"Error: too much mail from {who}"), "rate_messages")
        return None

    def recipient(self, session: ClientSession) -> Refusal | None:
        """
        C{RCPT}: C{450 4.7.1} past C{max_recipient_rate} for the client's
        user, else its address.
        """
        who = _who(session)
        if self._exceeds("recipient", who, self._limits.recipients, session):
            return Refusal(reply(450, "4.7.1", f"Error: too many recipients from {who}"),
                           "rate_recipients")
        return None

    def _exceeds(self, event: str, key: str, limit: int, session: ClientSession) -> bool:
        host = session.clientHost
        if not limit or not host or self._exempt(host):
            return False
        return self._counter.count(event, key) > limit


def _who(session: ClientSession) -> str:
    """
    Whose messages and recipients count: the authenticated user's, else
    the client address's.
    """
    return session.user if session.user is not None else session.clientHost
