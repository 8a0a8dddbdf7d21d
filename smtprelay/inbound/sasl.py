"""
The server side of the SASL exchange of C{AUTH} (RFC 4954) for the PLAIN
(RFC 4616) and LOGIN mechanisms, without a socket.

An L{SASLExchange} reads the AUTH argument and its continuation lines and
answers each with an outcome: a L{Challenge} to send, a L{Refusal} (bad
syntax, unknown mechanism, aborted, undecodable), L{Denied} (an
authorization identity that is not the user's), or the L{Credentials} to
check.  It also counts failed attempts against C{max_auth_failures}.
Whether AUTH may start at all is the session's state
(L{smtprelay.inbound.states.commandRefusal}).
"""

from __future__ import annotations

import base64
import binascii
from typing import Union

import attrs

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Refusal

MAX_RESPONSE_LINE = 12288
"""RFC 4954 §4: the longest AUTH command or response line we accept."""

USERNAME_CHALLENGE = b"334 VXNlcm5hbWU6\r\n"
PASSWORD_CHALLENGE = b"334 UGFzc3dvcmQ6\r\n"
EMPTY_CHALLENGE = b"334 \r\n"


@attrs.frozen
class Challenge:
    """
    Send C{line} (a C{334} continuation) and wait for the client's response.
    """

    line: bytes


@attrs.frozen
class Credentials:
    """
    The exchange is complete: check these.
    """

    mechanism: str
    username: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class Denied:
    """
    The credentials failed without a check: PLAIN's authorization identity
    names another user.
    """


Outcome = Union[Challenge, Credentials, Denied, Refusal]


class SASLExchange:
    """
    The AUTH exchanges of one session, one at a time.

    @param maxFailures: failed attempts after which the session ends.
    """

    def __init__(self, maxFailures: int) -> None:
        self._maxFailures = maxFailures
        self._failures = 0
        # The mechanism waiting for a response line, and LOGIN's username.
        self._pending: tuple[str, str | None] | None = None

    @property
    def waiting(self) -> bool:
        """
        Whether the next line is a response to a challenge, not a command.
        """
        return self._pending is not None

    def start(self, argument: bytes) -> Outcome:
        """
        C{AUTH mechanism [initial-response]}.
        """
        mechanism, _, initial = argument.partition(b" ")
        mechanism = mechanism.upper()
        initial = initial.strip(b" ")
        if not mechanism:
            return replies.AUTH_SYNTAX
        if mechanism == b"PLAIN":
            if initial:
                return self._plain(initial)
            self._pending = ("PLAIN", None)
            return Challenge(EMPTY_CHALLENGE)
        if mechanism == b"LOGIN":
            if not initial:
                self._pending = ("LOGIN", None)
                return Challenge(USERNAME_CHALLENGE)
            return self._login(None, initial)
        return replies.AUTH_MECHANISM

    def respond(self, line: bytes) -> Outcome:
        """
        The client's response to the last L{Challenge}; C{*} aborts.
        """
        assert self._pending is not None
        (mechanism, username), self._pending = self._pending, None
        if line == b"*":
            return replies.AUTH_ABORTED
        if mechanism == "PLAIN":
            return self._plain(line)
        return self._login(username, line)

    def failed(self) -> bool:
        """
        Count one failed attempt.

        @return: True when that was one too many: the session ends.
        """
        self._failures += 1
        return self._failures >= self._maxFailures

    def _plain(self, response: bytes) -> Outcome:
        decoded = _decode(response)
        if decoded is None:
            return replies.AUTH_UNDECODABLE
        parts = decoded.split("\0")
        if len(parts) != 3 or not parts[1]:
            return replies.AUTH_UNDECODABLE
        authzid, username, password = parts
        if authzid and authzid != username:
            return Denied()
        return Credentials("PLAIN", username, password)

    def _login(self, username: str | None, response: bytes) -> Outcome:
        decoded = _decode(response)
        if decoded is None:
            return replies.AUTH_UNDECODABLE
        if username is None:
            self._pending = ("LOGIN", decoded)
            return Challenge(PASSWORD_CHALLENGE)
        return Credentials("LOGIN", username, decoded)


def _decode(data: bytes) -> str | None:
    """
    One base64 SASL response (C{=} is empty), or L{None} if it is not
    base64 of UTF-8.
    """
    if data == b"=":
        return ""
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
