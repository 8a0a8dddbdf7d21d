"""
Tests for L{smtprelay.protocol.parameters}: which MAIL/RCPT parameters reach
the downstream, and how many final replies a transaction gets.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.trial.unittest import SynchronousTestCase

from smtprelay.protocol import replies
from smtprelay.protocol.replies import Reply
from smtprelay.protocol.parameters import (
    REQUIRETLS_UNAVAILABLE,
    Forwarded,
    finalReplies,
    mailParameters,
    rcptParameters,
)

ALL = {k: "" for k in ("8BITMIME", "SIZE", "SMTPUTF8", "DSN", "AUTH", "REQUIRETLS")}
BARE: dict[str, str] = {}


class MailParameterTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        Each parameter against what the downstream advertises, over TLS or
        not, for an authenticated client or not.
        """
        table: list[tuple[Mapping[str, str | None], dict[str, str], bool, bool, Forwarded | Reply]] = [
            # params, capabilities, tls, authenticated → forwarded | local reply
            ({"SIZE": "100"}, ALL, False, False, Forwarded({"SIZE": "100"})),
            ({"SIZE": "100"}, BARE, False, False, Forwarded({})),
            ({"SMTPUTF8": None}, ALL, False, False, Forwarded({"SMTPUTF8": None})),
            ({"SMTPUTF8": None}, BARE, False, False, Forwarded({})),
            ({"BODY": "7BIT"}, BARE, False, False, Forwarded({"BODY": "7BIT"})),
            ({"BODY": "8bitmime"}, ALL, False, False, Forwarded({"BODY": "8bitmime"})),
            ({"BODY": "8BITMIME"}, BARE, False, False, replies.CONVERSION_REQUIRED),
            ({"REQUIRETLS": None}, ALL, True, False, Forwarded({"REQUIRETLS": None})),
            ({"REQUIRETLS": None}, ALL, False, False, REQUIRETLS_UNAVAILABLE),
            ({"REQUIRETLS": None}, BARE, True, False, REQUIRETLS_UNAVAILABLE),
            ({"RET": "HDRS", "ENVID": "e"}, ALL, False, False, Forwarded({"RET": "HDRS", "ENVID": "e"})),
            ({"RET": "HDRS", "ENVID": "e"}, BARE, False, False, Forwarded({}, ("RET", "ENVID"))),
            ({"AUTH": "<>"}, ALL, False, True, Forwarded({"AUTH": "<>"})),
            ({"AUTH": "<>"}, ALL, False, False, Forwarded({})),
            ({"AUTH": "<>"}, BARE, False, True, Forwarded({})),
            ({"X-OTHER": "1"}, BARE, False, False, Forwarded({"X-OTHER": "1"})),
        ]
        for params, caps, tls, authenticated, expected in table:
            with self.subTest(params=params, caps=bool(caps), tls=tls, authenticated=authenticated):
                self.assertEqual(mailParameters(params, caps, tls=tls, authenticated=authenticated), expected)

    def test_orderKept(self) -> None:
        """
        The forwarded parameters keep the client's order.
        """
        forwarded = mailParameters(
            {"ENVID": "e", "SIZE": "1", "BODY": "7BIT", "RET": "FULL"}, ALL, tls=False, authenticated=False
        )
        assert isinstance(forwarded, Forwarded)
        self.assertEqual(list(forwarded.params), ["ENVID", "SIZE", "BODY", "RET"])


class RcptParameterTests(SynchronousTestCase):
    def test_dsn(self) -> None:
        """
        NOTIFY and ORCPT go only to a downstream that advertises DSN;
        anything else goes as it is.
        """
        params = {"NOTIFY": "NEVER", "ORCPT": "rfc822;b@example.net", "X-OTHER": None}
        self.assertEqual(rcptParameters(params, ALL), Forwarded(params))
        self.assertEqual(rcptParameters(params, BARE), Forwarded({"X-OTHER": None}, ("NOTIFY", "ORCPT")))


class FinalRepliesTests(SynchronousTestCase):
    def test_count(self) -> None:
        """
        One per accepted recipient in LMTP, at least one; one in SMTP.
        """
        self.assertEqual([finalReplies(True, n) for n in (0, 1, 3)], [1, 1, 3])
        self.assertEqual([finalReplies(False, n) for n in (0, 1, 3)], [1, 1, 1])
