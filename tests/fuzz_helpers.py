"""
Shared checks of the fuzzing tests: the shape of an SMTP reply stream, and
a log observer that catches failures logged instead of raised.
"""

from __future__ import annotations

import gc

import re
from typing import Any

from hypothesis import HealthCheck, settings
from twisted.logger import ILogObserver, globalLogPublisher
from zope.interface import implementer

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9](?:[ -][^\r\n]*)?")

FUZZ_SETTINGS = settings(
    max_examples=150,
    stateful_step_count=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
"""Deterministic and bounded: each fuzzing test runs in seconds in CI."""


def parseReplies(data: bytes) -> list[list[bytes]]:
    """
    Split a stream of replies into replies (their lines), checking that it
    is well-formed: every line C{NNN[ -]text} ended by CRLF, continuation
    lines with the code of their reply, and no reply cut off.

    @raise AssertionError: the stream is malformed.
    """
    if not data:
        return []
    assert data.endswith(b"\r\n"), f"reply stream does not end with CRLF: {data[-80:]!r}"
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    for line in data[:-2].split(b"\r\n"):
        assert REPLY_LINE.fullmatch(line), f"malformed reply line {line[:200]!r}"
        assert not current or line[:3] == current[0][:3], f"mixed codes in {current + [line]!r}"
        current.append(line)
        if line[3:4] != b"-":
            replies.append(current)
            current = []
    assert not current, f"reply cut off: {current!r}"
    return replies


def collectEarlierGarbage() -> None:
    """
    Call before a fuzzing run: an unhandled Deferred left by an earlier
    test logs its failure when the garbage collector finds it, which could
    be in the middle of the run and be taken for one of its failures.
    """
    gc.collect()


@implementer(ILogObserver)
class FailureCatcher:
    """
    Collects every logged failure (an exception that something caught and
    logged rather than let escape) while installed.
    """

    def __init__(self) -> None:
        self.failures: list[Any] = []
        globalLogPublisher.addObserver(self)

    def __call__(self, event: dict[str, Any]) -> None:
        if "log_failure" in event:
            self.failures.append(event["log_failure"])

    def remove(self) -> None:
        globalLogPublisher.removeObserver(self)
