"""
Tests for L{smtprelay.inbound.states.commandRefusal}: which command may run
in which state, and the refusal otherwise, as a table.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.states import TLS, Stage, commandRefusal
from smtprelay.protocol import replies


@attrs.frozen
class Facts:
    """
    A session's state, as L{smtprelay.inbound.states.Facts} reads it.
    """

    stage: Stage
    tls: TLS
    esmtp: bool
    secure: bool
    authenticated: bool
    rcptTried: bool
    tlsOffered: bool
    authOffered: bool


GREETED = Facts(stage=Stage.READY, tls=TLS.PLAIN, esmtp=True, secure=False, authenticated=False,
                rcptTried=False, tlsOffered=True, authOffered=True)


def facts(**changes: Any) -> Facts:
    return attrs.evolve(GREETED, **changes)


CASES = [
    # verb, argument, facts, refusal
    (b"MAIL", facts(stage=Stage.HELLO), replies.NEED_GREETING),
    (b"MAIL", facts(), None),
    (b"MAIL", facts(stage=Stage.MAIL), replies.NESTED_MAIL),
    (b"MAIL", facts(stage=Stage.BDAT), replies.NESTED_MAIL),
    (b"RCPT", facts(), replies.NEED_MAIL),
    (b"RCPT", facts(stage=Stage.HELLO), replies.NEED_MAIL),
    (b"RCPT", facts(stage=Stage.MAIL), None),
    (b"RCPT", facts(stage=Stage.RCPT), None),
    (b"RCPT", facts(stage=Stage.BDAT), None),
    (b"DATA", facts(stage=Stage.RCPT), None),
    (b"DATA", facts(stage=Stage.RCPT), None),
    (b"DATA", facts(), replies.NEED_MAIL),
    (b"DATA", facts(stage=Stage.MAIL), replies.NEED_RCPT),
    (b"DATA", facts(stage=Stage.MAIL, rcptTried=True), replies.NO_RECIPIENT_ACCEPTED),
    (b"DATA", facts(stage=Stage.BDAT), replies.BDAT_IN_PROGRESS),
    (b"DATA", facts(stage=Stage.HELLO), replies.NEED_MAIL),
    (b"BDAT", facts(stage=Stage.RCPT), None),
    (b"BDAT", facts(stage=Stage.BDAT), None),
    (b"BDAT", facts(stage=Stage.RCPT, esmtp=False), replies.NEED_EHLO),
    (b"BDAT", facts(), replies.NEED_MAIL),
    (b"BDAT", facts(stage=Stage.MAIL), replies.NEED_RCPT),
    (b"BDAT", facts(stage=Stage.MAIL, rcptTried=True), replies.NO_RECIPIENT_ACCEPTED),
    (b"STARTTLS", facts(), None),
    (b"STARTTLS", facts(stage=Stage.HELLO), None),
    (b"STARTTLS", facts(tlsOffered=False), replies.NOT_IMPLEMENTED),
    (b"STARTTLS", facts(tls=TLS.ACTIVE), replies.TLS_ACTIVE),
    (b"STARTTLS", facts(stage=Stage.MAIL), replies.IN_TRANSACTION),
    (b"AUTH", facts(secure=True), None),
    (b"AUTH", facts(authOffered=False, esmtp=False), replies.AUTH_DISABLED),
    (b"AUTH", facts(esmtp=False), replies.NEED_EHLO),
    (b"AUTH", facts(), replies.AUTH_NEEDS_TLS),
    (b"AUTH", facts(secure=True, authenticated=True, stage=Stage.MAIL), replies.AUTH_TWICE),
    (b"AUTH", facts(secure=True, stage=Stage.MAIL), replies.IN_TRANSACTION),
    # Commands the state does not restrict.
    (b"NOOP", facts(stage=Stage.HELLO), None),
    (b"RSET", facts(stage=Stage.BDAT), None),
    (b"EHLO", facts(stage=Stage.MAIL), None),
]

# Refusals whose order matters where several apply: the first one wins.
ARGUMENT_CASES = [
    (b"DATA", b"x", facts(), replies.DATA_SYNTAX),
    (b"STARTTLS", b"x", facts(), replies.STARTTLS_SYNTAX),
    (b"STARTTLS", b"x", facts(tls=TLS.ACTIVE), replies.TLS_ACTIVE),
    (b"STARTTLS", b"x", facts(stage=Stage.MAIL), replies.STARTTLS_SYNTAX),
]


class CommandRefusalTests(SynchronousTestCase):
    def test_table(self) -> None:
        for verb, state, expected in CASES:
            with self.subTest(verb=verb, state=state):
                self.assertIs(commandRefusal(verb, b"", state), expected)

    def test_arguments(self) -> None:
        for verb, argument, state, expected in ARGUMENT_CASES:
            with self.subTest(verb=verb, argument=argument, state=state):
                self.assertIs(commandRefusal(verb, argument, state), expected)

    def test_wire(self) -> None:
        """
        The refusals' exact bytes and metric reasons.
        """
        self.assertEqual(replies.NEED_GREETING.reply.toBytes(), b"503 5.5.1 Error: send HELO/EHLO first\r\n")
        self.assertEqual(replies.NO_RECIPIENT_ACCEPTED.reply.toBytes(), b"554 5.5.1 No valid recipients\r\n")
        self.assertEqual(replies.AUTH_NEEDS_TLS.reason, "tls_required")
        self.assertEqual(replies.IN_TRANSACTION.reason, "bad_sequence")
