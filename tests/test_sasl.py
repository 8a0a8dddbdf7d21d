"""
Tests for L{smtprelay.inbound.sasl}: the AUTH PLAIN and LOGIN exchanges,
their continuation lines and failure counting, without a socket.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.inbound.sasl import (
    EMPTY_CHALLENGE,
    PASSWORD_CHALLENGE,
    USERNAME_CHALLENGE,
    Challenge,
    Credentials,
    Denied,
    SASLExchange,
)
from smtprelay.protocol import replies


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


class PlainTests(SynchronousTestCase):
    def test_initialResponse(self) -> None:
        exchange = SASLExchange(3)
        self.assertEqual(exchange.start(b"PLAIN " + b64("\0user\0secret")),
                         Credentials("PLAIN", "user", "secret"))
        self.assertFalse(exchange.waiting)

    def test_continuation(self) -> None:
        """
        Without an initial response: an empty challenge, then the response
        line; the mechanism is case-insensitive.
        """
        exchange = SASLExchange(3)
        self.assertEqual(exchange.start(b"plain"), Challenge(EMPTY_CHALLENGE))
        self.assertEqual(EMPTY_CHALLENGE, b"334 \r\n")
        self.assertTrue(exchange.waiting)
        self.assertEqual(exchange.respond(b64("user\0user\0pw")), Credentials("PLAIN", "user", "pw"))
        self.assertFalse(exchange.waiting)

    def test_otherAuthorizationIdentity(self) -> None:
        """
        An authorization identity naming another user is denied unchecked.
        """
        self.assertEqual(SASLExchange(3).start(b"PLAIN " + b64("admin\0user\0pw")), Denied())

    def test_malformed(self) -> None:
        for response in (b"!!!", b64("user\0pw"), b64("\0\0pw"), base64.b64encode(b"\0u\0\xff")):
            with self.subTest(response):
                self.assertIs(SASLExchange(3).start(b"PLAIN " + response), replies.AUTH_UNDECODABLE)
        self.assertEqual(replies.AUTH_UNDECODABLE.reply.toBytes(), b"501 5.5.2 Cannot decode response\r\n")


class LoginTests(SynchronousTestCase):
    def test_twoChallenges(self) -> None:
        exchange = SASLExchange(3)
        self.assertEqual(exchange.start(b"LOGIN"), Challenge(USERNAME_CHALLENGE))
        self.assertEqual(exchange.respond(b64("user")), Challenge(PASSWORD_CHALLENGE))
        self.assertEqual(exchange.respond(b64("secret")), Credentials("LOGIN", "user", "secret"))
        self.assertEqual((USERNAME_CHALLENGE, PASSWORD_CHALLENGE),
                         (b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"))

    def test_initialUsername(self) -> None:
        exchange = SASLExchange(3)
        self.assertEqual(exchange.start(b"LOGIN " + b64("user")), Challenge(PASSWORD_CHALLENGE))
        self.assertEqual(exchange.respond(b"="), Credentials("LOGIN", "user", ""))

    def test_undecodable(self) -> None:
        """
        An undecodable line ends the exchange with C{501}.
        """
        exchange = SASLExchange(3)
        exchange.start(b"LOGIN")
        self.assertIs(exchange.respond(b"not base64!"), replies.AUTH_UNDECODABLE)
        self.assertFalse(exchange.waiting)
        self.assertIs(SASLExchange(3).start(b"LOGIN %%%"), replies.AUTH_UNDECODABLE)


class ExchangeTests(SynchronousTestCase):
    def test_aborted(self) -> None:
        exchange = SASLExchange(3)
        exchange.start(b"LOGIN")
        self.assertIs(exchange.respond(b"*"), replies.AUTH_ABORTED)
        self.assertFalse(exchange.waiting)

    def test_refusals(self) -> None:
        self.assertIs(SASLExchange(3).start(b""), replies.AUTH_SYNTAX)
        self.assertIs(SASLExchange(3).start(b"CRAM-MD5"), replies.AUTH_MECHANISM)

    def test_passwordNotInRepr(self) -> None:
        self.assertNotIn("secret", repr(Credentials("PLAIN", "user", "secret")))

    def test_failures(self) -> None:
        """
        L{SASLExchange.failed} says True at the C{maxFailures}th failure.
        """
        exchange = SASLExchange(2)
        self.assertFalse(exchange.failed())
        self.assertTrue(exchange.failed())
