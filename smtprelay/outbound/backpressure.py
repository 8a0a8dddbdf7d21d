"""
Back-pressure from a downstream connection to the client's upload.

While the body is written, L{Backpressure} is registered on the downstream
transport: when its write buffer fills, the client's socket (the producer
the relay registers) is paused, and resumed when it drains; when it does
not drain for C{data_timeout}, the body has stalled.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from zope.interface import implementer


@implementer(IPushProducer)
class Backpressure:
    """
    The downstream transport's producer, which passes its pauses on.

    @param timeout: seconds the body may stay paused.
    @param stalled: called when it stayed paused that long.
    """

    def __init__(self, clock: IReactorTime, timeout: float, stalled: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._stalled = stalled
        self._producer: IPushProducer | None = None
        self._paused = False
        self._stall: IDelayedCall | None = None

    # -- the client's producer ---------------------------------------------

    def register(self, producer: IPushProducer) -> None:
        """
        Pass pauses on to C{producer}, paused at once if the downstream is.
        """
        self._producer = producer
        if self._paused:
            producer.pauseProducing()

    def unregister(self) -> None:
        self._producer = None

    def release(self) -> None:
        """
        The body can no longer reach the downstream: stop holding the
        client's upload (a dead downstream must not hold it), which is then
        read to its end-of-data and discarded; the end-of-data gets the
        failure.
        """
        producer, self._producer = self._producer, None
        self._paused = False
        if producer is not None:
            producer.stopProducing()

    def settle(self) -> None:
        """
        The body is over: no stall to watch, nothing paused.
        """
        self.stopProducing()
        self._paused = False

    # -- IPushProducer, for the downstream transport -------------------------

    def pauseProducing(self) -> None:
        self._paused = True
        if self._producer is not None:
            self._producer.pauseProducing()
        if self._stall is None or not self._stall.active():
            self._stall = self._clock.callLater(self._timeout, self._stalledNow)

    def resumeProducing(self) -> None:
        self._paused = False
        self.stopProducing()
        if self._producer is not None:
            self._producer.resumeProducing()

    def stopProducing(self) -> None:
        """
        Watch for no stall (the transport is done with us).
        """
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalledNow(self) -> None:
        self._stall = None
        self._stalled()
