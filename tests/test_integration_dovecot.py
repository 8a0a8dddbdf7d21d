"""
Dovecot LMTP as the downstream of a real C{twistd -n smtprelay}, with
clients that have several recipients: C{smtplib} and Postfix (a private
instance whose C{relayhost} is the relay) to an SMTP listener under each
C{lmtp_split} policy, and a raw LMTP client to an LMTP listener.

Dovecot's users (C{tests/dovecot-lmtp.sh}): alice, bob, carol and dave
take mail; C{full} is over quota for any real message (C{552 5.2.2} after
the dot); any other name is unknown (C{550 5.1.1} at RCPT).  The policy
C{one_rcpt} with one SMTP client is also covered in
L{tests.test_integration_relay.DovecotLMTPTests}.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, STARTUP, Postfix, Processes, waitFor

USERS = ["alice", "bob", "carol", "dave"]

MESSAGE = b"From: s@example.org\r\nSubject: several recipients\r\n\r\n" + b"x" * 2000 + b"\r\n"
"""Over the 1 KB quota of C{full}."""


class DovecotTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.procs = Processes(self)
        self.dovecot = self.procs.dovecot()

    def copies(self, user: str) -> int:
        """
        How many messages C{user}'s Maildir holds.
        """
        new = os.path.join(self.dovecot, "mail", user, "Maildir", "new")
        return len(os.listdir(new)) if os.path.isdir(new) else 0

    def waitForCopies(self, **expected: int) -> None:
        """
        Wait until each user holds the given number of messages, then check
        that no other message arrived for any user.
        """
        waitFor(f"deliveries {expected}", lambda: all(self.copies(u) >= n for u, n in expected.items()))
        self.assertEqual({u: self.copies(u) for u in USERS + ["full"]},
                         {u: expected.get(u, 0) for u in USERS + ["full"]})

    def relayTo(self, split: str, listener: str = "smtp tcp://127.0.0.1:{port}") -> int:
        return self.procs.relayConfig(
            f"hostname relay.test\n{listener} {{\n"
            f"    deliver_to lmtp unix://{self.dovecot}/lmtp {{\n        lmtp_split {split}\n    }}\n}}\n"
        )


class TempfailPolicyTests(DovecotTestCase):
    """
    C{lmtp_split tempfail}: an SMTP client's recipients go in one LMTP
    transaction; Dovecot's per-recipient verdicts become one reply.
    """

    def setUp(self) -> None:
        super().setUp()
        self.relay = self.relayTo("tempfail")

    def send(self, recipients: list[str]) -> dict:
        with smtplib.SMTP(HOST, self.relay, local_hostname="client.test", timeout=STARTUP) as client:
            return client.sendmail("s@example.org", recipients, MESSAGE)

    def test_allDelivered(self) -> None:
        """
        Every accepted recipient delivered: the client gets one C{250} and
        each user one copy; an unknown user is refused at RCPT with
        Dovecot's own C{550 5.1.1} and does not spoil the others.
        """
        refused = self.send(["alice", "nosuchuser", "bob", "carol"])
        self.assertEqual(list(refused), ["nosuchuser"])
        code, text = refused["nosuchuser"]
        self.assertEqual((code, text[:6]), (550, b"5.1.1 "))
        self.waitForCopies(alice=1, bob=1, carol=1)

    def test_commonRefusalPassesThrough(self) -> None:
        """
        When every recipient gets the same verdict, that verdict is the
        reply: Dovecot's own C{552 5.2.2} for the user over quota.
        """
        with self.assertRaises(smtplib.SMTPDataError) as refused:
            self.send(["full"])
        self.assertEqual(refused.exception.smtp_code, 552)
        self.assertTrue(refused.exception.smtp_error.startswith(b"5.2.2 "), refused.exception.smtp_error)
        self.waitForCopies()

    def test_mixedVerdictsTempfail(self) -> None:
        """
        alice delivered, full over quota: no single reply is true for both,
        so the client gets a C{451} and will retry both (alice may get a
        duplicate; nobody loses mail).  The relay logs what happened to
        each recipient, as Dovecot said it.
        """
        with self.assertRaises(smtplib.SMTPDataError) as refused:
            self.send(["alice", "full"])
        self.assertEqual(refused.exception.smtp_code, 451)
        self.assertTrue(refused.exception.smtp_error.startswith(b"4."), refused.exception.smtp_error)
        self.waitForCopies(alice=1)
        for line in (r": to=<alice> relay=\S+ status=sent reply=250 2\.0\.0 ",
                     r": to=<full> relay=\S+ status=bounced reply=552 5\.2\.2 "):
            waitFor(f"the relay's log line {line!r}", lambda: re.search(line, self.procs.log(f"relay-{self.relay}")))


class LMTPListenerTests(DovecotTestCase):
    """
    An LMTP client gets Dovecot's reply for each recipient, whatever the
    target's C{lmtp_split} (the policy is for SMTP clients only).
    """

    def test_perRecipientRepliesUnderTempfail(self) -> None:
        client = socket.create_connection((HOST, self.relayTo("tempfail", "lmtp tcp://127.0.0.1:{port}")),
                                          timeout=STARTUP)
        self.addCleanup(client.close)
        reader = client.makefile("rb")

        def reply() -> bytes:
            lines = [reader.readline()]
            while lines[-1][3:4] == b"-":
                lines.append(reader.readline())
            return lines[-1]

        self.assertTrue(reply().startswith(b"220 "))
        client.sendall(b"LHLO client.test\r\n")
        self.assertTrue(reply().startswith(b"250 "))
        for command in [b"MAIL FROM:<s@example.org>", b"RCPT TO:<alice>", b"RCPT TO:<nosuchuser>",
                        b"RCPT TO:<full>", b"RCPT TO:<bob>", b"DATA"]:
            client.sendall(command + b"\r\n")
            self.assertRegex(reply(), {b"DATA": rb"^354 ", b"RCPT TO:<nosuchuser>": rb"^550 5\.1\.1 "}
                             .get(command, rb"^250 "))
        client.sendall(MESSAGE + b".\r\n")
        self.assertEqual([reply()[:9] for _ in range(3)], [b"250 2.0.0", b"552 5.2.2", b"250 2.0.0"])
        self.waitForCopies(alice=1, bob=1)


class PostfixClientTests(DovecotTestCase):
    """
    Postfix as the client of an SMTP listener whose target is Dovecot LMTP
    (issue 13 item 9): what it takes for a real MTA to deliver a message
    with four recipients promptly and exactly once.
    """

    def postfix(self, split: str, main: str = "", master: str = "") -> Postfix:
        client = self.procs.postfix("client", str(self.relayTo(split)), main=main, master=master)
        client.sendmail("s@example.org", USERS, MESSAGE)
        return client

    def assertOneQueueRun(self, client: Postfix) -> None:
        client.waitForLog(r"status=sent \(250 2\.0\.0 ", len(USERS))
        self.waitForCopies(**{u: 1 for u in USERS})
        self.assertEqual(len(re.findall(r"from=<s@example\.org>, .*\(queue active\)", client.log())), 1)
        self.assertNotIn("status=deferred", client.log())

    def test_oneRecipientPerTransactionWithRecipientLimitOne(self) -> None:
        """
        C{one_rcpt} and C{smtp_destination_recipient_limit = 1}: Postfix
        sends each recipient in its own transaction from the start, so all
        four are delivered in the first queue run, once each.
        """
        self.assertOneQueueRun(self.postfix("one_rcpt", "smtp_destination_recipient_limit = 1"))

    def test_oneRecipientPerTransactionWithATransportOfItsOwn(self) -> None:
        """
        The same with the limit on a transport of its own for the relay
        (C{lmtpfront_destination_recipient_limit = 1}), as a Postfix that
        sends other mail elsewhere would be configured.
        """
        client = self.postfix("one_rcpt", "default_transport = lmtpfront\nlmtpfront_destination_recipient_limit = 1",
                              master="lmtpfront unix - - n - - smtp -o syslog_name=postfix/lmtpfront")
        self.assertOneQueueRun(client)
        self.assertEqual(len(re.findall(r" postfix/lmtpfront/smtp\[\d+\]: \w+: to=<\w+@.* status=sent ", client.log())),
                         len(USERS))

    def test_oneRecipientPerTransactionDefaultClient(self) -> None:
        """
        C{one_rcpt} and Postfix's defaults: each queue run delivers one
        recipient and defers the others with C{452 4.5.3}; each flush of
        the queue delivers one more, and every user gets exactly one copy.
        """
        client = self.postfix("one_rcpt")
        deferrals = 0
        for run in range(1, len(USERS) + 1):
            # Run N delivers the Nth recipient and defers the others.
            deferrals += len(USERS) - run
            client.waitForLog(r"status=sent \(250 2\.0\.0 ", run)
            client.waitForLog(r"status=deferred \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: 452 4\.5\.3 Too many "
                              r"recipients, send the rest in a new transaction", deferrals)
            client.flush()
        self.waitForCopies(**{u: 1 for u in USERS})
        waitFor("an empty queue", lambda: not client.queue())
        self.assertNotIn("status=bounced", client.log())

    def test_tempfailDeliversInOneTransaction(self) -> None:
        """
        C{tempfail} and Postfix's defaults: the four recipients go in one
        transaction, all delivered in the first queue run, once each.
        """
        self.assertOneQueueRun(self.postfix("tempfail"))
