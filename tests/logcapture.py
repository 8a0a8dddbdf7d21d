"""
The events logged while a test runs, collected by a typed L{ILogObserver}.
"""

from __future__ import annotations

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer


@implementer(ILogObserver)
class Appender:
    """
    An observer that appends each event to a list.
    """

    def __init__(self, events: list[LogEvent]) -> None:
        self._events = events

    def __call__(self, event: LogEvent) -> None:
        self._events.append(event)


def captureEvents(case: SynchronousTestCase) -> list[LogEvent]:
    """
    Collect every event logged to the global publisher from now until the
    end of C{case}.

    @return: the list the events are appended to, in order.
    """
    events: list[LogEvent] = []
    observer = Appender(events)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events
