"""
End to end on 127.0.0.1: routing blocks in a real
C{twistd -n smtprelay}, with C{smtplib} as the client and two Postfix
C{smtp-sink}s, A and B, as targets.

The listener routes by sender first (C{source}: C{boss@example.org} and
C{corp.test} go to the named target C{&corp}, which is sink A;
C{spam.test} is refused), then, for every other sender, by recipient
(C{destination}: C{a.test} → A, C{b.test} and the single address
C{B@C.TEST} → B, anything else refused).

The sinks run with C{-v}: their log shows each SMTP command they receive,
so a test can tell that a sink saw no SMTP session at all (the readiness
probe of L{tests.procs.waitForPort} connects but sends nothing).
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, Processes, freePort, need, sinkMessages
from .test_integration_relay import splitSinkDump

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: Rcpt <rcpt@example.net>\r\n"
    b"Subject: routing\r\n"
    b"Message-Id: <routing@example.org>\r\n"
    b"\r\n"
    b"routed body\r\n"
)

ELSEWHERE = b"4.5.3 Recipient routed elsewhere"

CHECK = os.path.join(os.path.dirname(sys.executable), "smtprelay-check")


def routingConfig(listen: int, portA: int, portB: int) -> str:
    """
    The configuration under test: the listener on C{listen}, sink A on
    C{portA} (both as the named target C{corp} and inline), sink B on
    C{portB}.
    """
    return f"""\
hostname relay.test
target.smtp corp {{
    targets tcp://{HOST}:{portA}
}}
smtp tcp://{HOST}:{listen} {{
    source boss@example.org corp.test {{ deliver_to &corp }}
    source spam.test {{ reject 550 5.7.1 "senders from spam.test are refused" }}
    destination a.test {{ deliver_to smtp tcp://{HOST}:{portA} }}
    destination b.test B@C.TEST {{ deliver_to smtp tcp://{HOST}:{portB} }}
    default_destination {{ reject 550 5.1.2 "unknown domain" }}
}}
"""


def envelopes(dumps: list[bytes]) -> list[tuple[list[bytes], list[bytes]]]:
    """
    The (X-Mail-Args, X-Rcpt-Args) of each dumped message, sorted (the
    dump files are named by the second only, so their order is not the
    order of arrival).  Each message must be L{MESSAGE}, which smtp-sink
    writes with LF line ends and an empty line after it.
    """
    out = []
    for dump in dumps:
        envelope, _, body = splitSinkDump(dump)
        assert body == MESSAGE.replace(b"\r\n", b"\n") + b"\n", body
        out.append((envelope["X-Mail-Args"], envelope["X-Rcpt-Args"]))
    return sorted(out)


class RoutingTests(SynchronousTestCase):
    """
    smtplib → relay with routing blocks → smtp-sink A or B.
    """

    def setUp(self) -> None:
        need("smtp-sink")
        self.procs = Processes(self)
        self.portA, self.dumpsA = self.procs.smtpSink(extra=["-v"])
        self.portB, self.dumpsB = self.procs.smtpSink(extra=["-v"])
        self.config = os.path.join(self.procs.dir, "relay.conf")
        self.port = freePort()
        with open(self.config, "w") as f:
            f.write(routingConfig(self.port, self.portA, self.portB))
        self.procs.relay("--config", self.config, port=self.port)

    def client(self) -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, self.port, local_hostname="client.test", timeout=60)
        self.addCleanup(client.close)
        return client

    def sinkCommands(self, port: int) -> list[str]:
        """
        The SMTP commands sink C{port} logged so far (C{-v}), as the
        client sent them: C{EHLO relay.test}, C{MAIL FROM:<...>}...
        """
        log = self.procs.log(f"smtp-sink-{port}")
        return re.findall(r"^smtp-sink: ((?:ehlo|helo|mail|rcpt|data|bdat|rset|noop|quit)\b.*)$", log, re.M | re.I)

    def assertNoSession(self, port: int, dumps: str) -> None:
        """
        Sink C{port} got no connection but the readiness probe's (which
        was logged before the relay started), no SMTP command and holds no
        message.
        """
        self.assertEqual(self.sinkCommands(port), [])
        self.assertEqual(self.procs.log(f"smtp-sink-{port}").count("smtp-sink: connect ("), 1)
        self.assertEqual(os.listdir(dumps), [])

    def test_recipientDomainChoosesTheSink(self) -> None:
        """
        Recipients in a.test arrive at A only and those in b.test at B
        only; matching ignores case (C{x@A.TEST} goes to A, the rule
        C{B@C.TEST} takes C{b@c.test}); the address rule C{b@c.test} beats
        the default for its domain, whose other addresses get the
        C{default_destination} rejection.
        """
        with self.client() as client:
            self.assertEqual(client.sendmail("s@example.org", ["x@a.test"], MESSAGE), {})
            self.assertEqual(client.sendmail("s@example.org", ["y@b.test"], MESSAGE), {})
            self.assertEqual(client.sendmail("s@example.org", ["x@A.TEST"], MESSAGE), {})
            self.assertEqual(client.sendmail("s@example.org", ["b@c.test"], MESSAGE), {})
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("s@example.org", ["other@c.test"], MESSAGE)
            self.assertEqual(refused.exception.recipients, {"other@c.test": (550, b"5.1.2 unknown domain")})
        self.assertEqual(envelopes(sinkMessages(self.dumpsA, 2)), [
            ([b"<s@example.org>"], [b"<x@A.TEST>"]),
            ([b"<s@example.org>"], [b"<x@a.test>"]),
        ])
        self.assertEqual(envelopes(sinkMessages(self.dumpsB, 2)), [
            ([b"<s@example.org>"], [b"<b@c.test>"]),
            ([b"<s@example.org>"], [b"<y@b.test>"]),
        ])
        self.assertEqual(len(os.listdir(self.dumpsA)), 2)
        self.assertEqual(len(os.listdir(self.dumpsB)), 2)
        for port in (self.portA, self.portB):
            self.assertNotIn("RCPT TO:<other@c.test>", self.sinkCommands(port))

    def test_unknownDomainRejectedAtRcpt(self) -> None:
        """
        A recipient in a domain no rule names gets exactly the
        C{default_destination} reply, C{550 5.1.2 unknown domain}, at
        RCPT (MAIL was accepted), and no sink sees a session.
        """
        with self.client() as client:
            client.ehlo("client.test")
            self.assertEqual(client.mail("s@example.org"), (250, b"2.1.0 OK"))
            self.assertEqual(client.rcpt("x@unknown.test"), (550, b"5.1.2 unknown domain"))
            client.rset()
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail("s@example.org", ["x@unknown.test"], MESSAGE)
            self.assertEqual(refused.exception.recipients, {"x@unknown.test": (550, b"5.1.2 unknown domain")})
            self.assertEqual(client.noop(), (250, b"2.0.0 OK"))
        self.assertNoSession(self.portA, self.dumpsA)
        self.assertNoSession(self.portB, self.dumpsB)

    def test_oneTransactionOneTarget(self) -> None:
        """
        The first routed recipient chooses the transaction's target: a
        later recipient routed to another target gets 451 4.5.3, the
        message reaches A with x@a.test only and B nothing; the same
        client session then sends y@b.test in a second transaction, which
        reaches B.
        """
        with self.client() as client:
            refused = client.sendmail("s@example.org", ["x@a.test", "y@b.test"], MESSAGE)
            self.assertEqual(list(refused), ["y@b.test"])
            code, text = refused["y@b.test"]
            self.assertEqual(code, 451)
            self.assertTrue(text.startswith(ELSEWHERE), text)
            self.assertRegex(text.decode(), r"^4\.5\.3 Recipient routed elsewhere, send it in a separate transaction \[\w+\]$")
            [dumpA] = sinkMessages(self.dumpsA)
            self.assertEqual(envelopes([dumpA]), [([b"<s@example.org>"], [b"<x@a.test>"])])
            self.assertNoSession(self.portB, self.dumpsB)
            self.assertEqual(client.sendmail("s@example.org", ["y@b.test"], MESSAGE), {})
        [dumpB] = sinkMessages(self.dumpsB)
        self.assertEqual(envelopes([dumpB]), [([b"<s@example.org>"], [b"<y@b.test>"])])
        self.assertEqual(len(os.listdir(self.dumpsA)), 1)
        self.assertNotIn("RCPT TO:<y@b.test>", self.sinkCommands(self.portA))

    def test_senderDomainRejectedAtMail(self) -> None:
        """
        MAIL FROM a sender in spam.test, in any case, gets exactly the
        rule's C{550 5.7.1 senders from spam.test are refused}, and no sink
        sees a session; a later transaction from another sender on the
        same session is routed as usual.
        """
        with self.client() as client:
            for sender in ("x@spam.test", "X@Spam.Test"):
                with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
                    client.sendmail(sender, ["x@a.test"], MESSAGE)
                self.assertEqual((refused.exception.smtp_code, refused.exception.smtp_error, refused.exception.sender),
                                 (550, b"5.7.1 senders from spam.test are refused", sender))
            self.assertNoSession(self.portA, self.dumpsA)
            self.assertNoSession(self.portB, self.dumpsB)
            self.assertEqual(client.sendmail("s@example.org", ["x@a.test"], MESSAGE), {})
        self.assertEqual(envelopes(sinkMessages(self.dumpsA)), [([b"<s@example.org>"], [b"<x@a.test>"])])
        self.assertEqual([c for c in self.sinkCommands(self.portA) if c.startswith("MAIL ")],
                         ["MAIL FROM:<s@example.org>"])
        self.assertNoSession(self.portB, self.dumpsB)

    def test_senderRuleRoutesEveryRecipient(self) -> None:
        """
        A sender that a C{source} rule routes (the address
        boss@example.org, anyone in corp.test) goes to C{&corp}, sink A,
        whatever the recipients: z@b.test and even x@unknown.test, which
        the C{destination} rules would send to B or refuse.  Another
        sender of example.org is routed by recipient (the rule is the
        address, not its domain).
        """
        with self.client() as client:
            self.assertEqual(client.sendmail("boss@example.org", ["z@b.test"], MESSAGE), {})
            self.assertEqual(client.sendmail("Anyone@CORP.test", ["z@b.test", "x@unknown.test"], MESSAGE), {})
            self.assertEqual(client.sendmail("clerk@example.org", ["z@b.test"], MESSAGE), {})
        self.assertEqual(envelopes(sinkMessages(self.dumpsA, 2)), [
            ([b"<Anyone@CORP.test>"], [b"<z@b.test>", b"<x@unknown.test>"]),
            ([b"<boss@example.org>"], [b"<z@b.test>"]),
        ])
        self.assertEqual(envelopes(sinkMessages(self.dumpsB)), [([b"<clerk@example.org>"], [b"<z@b.test>"])])
        self.assertEqual(len(os.listdir(self.dumpsA)), 2)


class RoutingCheckTests(SynchronousTestCase):
    """
    The checker on the routing configuration (no process but the checker).
    """

    def check(self, *args: str) -> subprocess.CompletedProcess:
        if shutil.which(CHECK):
            argv = [CHECK]
        else:
            argv = [sys.executable, "-m", "smtprelay", "check"]
        return subprocess.run(argv + list(args), capture_output=True, timeout=60)

    def test_checkShowRoundTrip(self) -> None:
        """
        C{smtprelay-check --show} accepts the routing configuration and
        writes its C{source}, C{destination} and C{default_destination}
        blocks (rule keys without case); that output is accepted again and
        shows the same configuration.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "relay.conf")
        shown = os.path.join(directory, "shown.conf")
        with open(config, "w") as f:
            f.write(routingConfig(2525, 2526, 2527))
        first = self.check("--show", config)
        self.assertEqual(first.returncode, 0, first.stderr.decode())
        self.assertEqual(first.stderr, b"")
        with open(shown, "wb") as f:
            f.write(first.stdout)
        lines = first.stdout.decode().splitlines()
        for line in [
            "target.smtp corp {",
            "    targets tcp://127.0.0.1:2526",
            "smtp tcp://127.0.0.1:2525 {",
            "    source boss@example.org corp.test {",
            "        deliver_to &corp",
            "    source spam.test {",
            '        reject 550 5.7.1 "senders from spam.test are refused"',
            "    destination a.test {",
            "            targets tcp://127.0.0.1:2526",
            "    destination b.test b@c.test {",
            "            targets tcp://127.0.0.1:2527",
            "    default_destination {",
            '        reject 550 5.1.2 "unknown domain"',
        ]:
            self.assertIn(line, lines)
        again = self.check(shown)
        self.assertEqual((again.returncode, again.stdout, again.stderr), (0, f"{shown}: OK\n".encode(), b""))
        second = self.check("--show", shown)
        self.assertEqual(second.returncode, 0, second.stderr.decode())
        self.assertEqual(second.stdout.split(b"\n", 1)[1], first.stdout.split(b"\n", 1)[1])
