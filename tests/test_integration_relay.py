"""
End to end on 127.0.0.1 with real processes: C{swaks}/C{smtplib} →
C{twistd -n smtprelay} → Postfix C{smtp-sink} (SMTP and LMTP) or Dovecot LMTP.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase

from .procs import (
    HOST,
    TWISTD,
    Processes,
    freePort,
    need,
    sinkAborted,
    sinkMessages,
    waitForPath,
    waitForPort,
)

MESSAGE = (
    b"From: Sender <sender@example.org>\r\n"
    b"To: Rcpt <rcpt@example.net>\r\n"
    b"Subject: integration\r\n"
    b"Message-Id: <1@example.org>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line that starts with a dot\r\n"
    b"..two dots\r\n"
    b".\tdot tab\r\n"
    b"last line\r\n"
)


def splitSinkDump(dump: bytes) -> tuple[dict[str, list[bytes]], bytes, bytes]:
    """
    An smtp-sink dump file → (its X- envelope headers, our Received:
    header, the message as the relay sent it).  smtp-sink writes LF line
    ends and puts its own 3-line Received: header first.
    """
    lines = dump.split(b"\n")
    envelope: dict[str, list[bytes]] = {}
    i = 0
    while lines[i].startswith(b"X-"):
        key, _, value = lines[i].partition(b": ")
        envelope.setdefault(key.decode(), []).append(value)
        i += 1
    assert lines[i].startswith(b"Received: from "), lines[i]
    i += 1
    while lines[i].startswith(b"\t"):
        i += 1
    assert lines[i].startswith(b"Received: from "), lines[i]
    start = i
    i += 1
    while lines[i].startswith(b"\t"):
        i += 1
    return envelope, b"\n".join(lines[start:i]), b"\n".join(lines[i:])


def memoryKB(pid: int) -> dict[str, int]:
    """
    The C{Vm*} lines of C{/proc/PID/status}, in kB.
    """
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) for k, v in (l.split(":", 1) for l in f) if k.startswith("Vm")}


def swaks(*args: str) -> subprocess.CompletedProcess:
    need("swaks")
    return subprocess.run(["swaks", "--helo", "client.test", *args], capture_output=True, timeout=120)


class SMTPSinkTests(SynchronousTestCase):
    """
    swaks and smtplib through the relay to Postfix's smtp-sink.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)

    def relayTo(self, *targets: int, lmtp: bool = False) -> int:
        args = [a for port in targets for a in ("--target", f"tcp://{HOST}:{port}")]
        return self.procs.relay(*args, "--hostname", "relay.test", *(["--lmtp"] if lmtp else []))

    def test_swaksMessageArrivesByteIdentical(self) -> None:
        """
        The message swaks sends through the relay arrives byte for byte as
        the same message sent by swaks straight to the sink, apart from our
        one Received: header; the envelope is the client's.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = self.relayTo(sinkPort)
        path = os.path.join(self.procs.dir, "message.eml")
        with open(path, "wb") as f:
            f.write(MESSAGE)
        send = ("--from", "sender@example.org", "--to", "rcpt@example.net", "--data", path)
        direct = swaks("--server", f"{HOST}:{sinkPort}", *send)
        self.assertEqual(direct.returncode, 0, direct.stdout.decode())
        [directDump] = sinkMessages(dumps)
        os.unlink(os.path.join(dumps, os.listdir(dumps)[0]))
        relayed = swaks("--server", f"{HOST}:{port}", *send)
        self.assertEqual(relayed.returncode, 0, relayed.stdout.decode())
        [dump] = sinkMessages(dumps)
        envelope, received, body = splitSinkDump(dump)
        self.assertEqual(envelope["X-Mail-Args"], [b"<sender@example.org>"])
        self.assertEqual(envelope["X-Rcpt-Args"], [b"<rcpt@example.net>"])
        lines = directDump.split(b"\n")
        firstHeader = next(i for i, l in enumerate(lines) if l.startswith(b"From: "))
        self.assertEqual(body, b"\n".join(lines[firstHeader:]))
        self.assertTrue(body.startswith(MESSAGE.replace(b"\r\n", b"\n")))
        self.assertTrue(received.startswith(b"Received: from client.test ([127.0.0.1])\n"
                                            b"\tby relay.test (smtprelay) with ESMTP id "), received)
        self.assertIn(b"\tfor <rcpt@example.net>; ", received)

    def test_downstreamRejectionReachesSwaksVerbatim(self) -> None:
        """
        The downstream's exact code, enhanced code and text reach the
        client.
        """
        sinkPort, dumps = self.procs.smtpSink(extra=["-f", "RCPT", "-B", "550 5.1.1 <x>: mailbox unavailable here"])
        port = self.relayTo(sinkPort)
        done = swaks("--server", f"{HOST}:{port}", "--to", "rcpt@example.net")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn(b"<** 550 5.1.1 <x>: mailbox unavailable here\n", done.stdout)
        sinkAborted(dumps)

    def test_smtplibTwoTransactionsOneSession(self) -> None:
        """
        Several transactions on one client session, with RSET between.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = self.relayTo(sinkPort)
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            client.sendmail("a@example.org", ["r1@example.net"], MESSAGE)
            client.rset()
            client.sendmail("b@example.org", ["r2@example.net", "r3@example.net"], MESSAGE)
        dumpsSeen = sinkMessages(dumps, 2)
        rcpts = sorted(splitSinkDump(d)[0]["X-Rcpt-Args"] for d in dumpsSeen)
        self.assertEqual(rcpts, [[b"<r1@example.net>"], [b"<r2@example.net>", b"<r3@example.net>"]])

    def test_smtplibUTF8DownConversion(self) -> None:
        """
        SMTPUTF8 to a downstream without it (smtp-sink): IDN domains arrive
        as A-labels; a non-ASCII local part is refused with 550 5.6.7.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = self.relayTo(sinkPort)
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            client.ehlo("client.test")
            self.assertTrue(client.has_extn("smtputf8"))
            with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("jösé@exämple.org", ["rcpt@example.net"], MESSAGE,
                                mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            self.assertEqual(refused.exception.smtp_code, 550)
            self.assertTrue(refused.exception.smtp_error.startswith(b"5.6.7 "))
            client.rset()
            client.sendmail("jose@exämple.org", ["rcpt@exämple.net"], MESSAGE,
                            mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        [dump] = sinkMessages(dumps)
        envelope = splitSinkDump(dump)[0]
        self.assertEqual(envelope["X-Mail-Args"], [b"<jose@xn--exmple-cua.org> BODY=8BITMIME"])
        self.assertEqual(envelope["X-Rcpt-Args"], [b"<rcpt@xn--exmple-cua.net>"])

    def test_lmtpDownstreamOneRecipientPerTransaction(self) -> None:
        """
        SMTP client → LMTP target (smtp-sink -L): the second recipient is
        deferred with 452 4.5.3 so that the first's reply is exact.
        """
        sinkPort, dumps = self.procs.smtpSink(lmtp=True)
        port = self.relayTo(sinkPort, lmtp=True)
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            refused = client.sendmail("a@example.org", ["r1@example.net", "r2@example.net"], MESSAGE)
        self.assertEqual(refused, {"r2@example.net": (452, b"4.5.3 Too many recipients, send the rest in a new transaction")})
        [dump] = sinkMessages(dumps)
        self.assertEqual(splitSinkDump(dump)[0]["X-Client-Proto"], [b"LMTP"])

    def test_failoverFromRefusingTarget(self) -> None:
        """
        The first target refuses connections: the message reaches the
        second.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = self.relayTo(freePort(), sinkPort)
        done = swaks("--server", f"{HOST}:{port}", "--to", "rcpt@example.net")
        self.assertEqual(done.returncode, 0, done.stdout.decode())
        self.assertEqual(len(sinkMessages(dumps)), 1)

    def test_failoverFromSilentTarget(self) -> None:
        """
        The first target accepts TCP and says nothing: after
        command_timeout the second target gets the message.
        """
        silent = socket.socket()
        silent.bind((HOST, 0))
        silent.listen(8)
        self.addCleanup(silent.close)
        sinkPort, dumps = self.procs.smtpSink()
        config = os.path.join(self.procs.dir, "relay.conf")
        port = freePort()
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
smtp tcp://{HOST}:{port} {{
    deliver_to smtp tcp://{HOST}:{silent.getsockname()[1]} tcp://{HOST}:{sinkPort} {{
        command_timeout 1s
    }}
}}
""")
        self.procs.relay("--config", config, port=port)
        done = swaks("--server", f"{HOST}:{port}", "--to", "rcpt@example.net")
        self.assertEqual(done.returncode, 0, done.stdout.decode())
        self.assertEqual(len(sinkMessages(dumps)), 1)

    def test_allTargetsDown(self) -> None:
        port = self.relayTo(freePort(), freePort())
        done = swaks("--server", f"{HOST}:{port}", "--to", "rcpt@example.net")
        self.assertRegex(done.stdout.decode(), r"<\*\* 451 4\.4\.1 No downstream server available \[\w+\]")

    def test_bigMessageStreamsWithBoundedMemory(self) -> None:
        """
        A 50 MB message streams through: the relay's peak RSS stays well
        below the message size.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = self.relayTo(sinkPort)
        line = b"x" * 998 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (50 * 1024 * 1024 // len(line))
        relayPid = self.procs._procs[-1].pid
        with smtplib.SMTP(HOST, port, timeout=120) as client:
            client.noop()
            before = memoryKB(relayPid)["VmRSS"]
            client.sendmail("a@example.org", ["r@example.net"], body)
        [dump] = sinkMessages(dumps)
        self.assertGreater(len(dump), 50 * 1000 * 1000)
        growth = memoryKB(relayPid)["VmHWM"] - before
        self.assertLess(growth, 16 * 1024, f"relay peak RSS grew by {growth} kB for a 50 MB message")


class DovecotLMTPTests(SynchronousTestCase):
    """
    Real per-recipient LMTP results from Dovecot over a unix socket.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)
        self.dovecot = self.procs.dovecot()
        self.socket = os.path.join(self.dovecot, "lmtp")

    def delivered(self, user: str) -> list[bytes]:
        new = os.path.join(self.dovecot, "mail", user, "Maildir", "new")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (os.path.isdir(new) and os.listdir(new)):
            time.sleep(0.05)
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def test_smtpToDovecotPerRecipientVerdicts(self) -> None:
        """
        One recipient per transaction: alice is delivered byte-identical
        apart from headers Dovecot and we add; an unknown user and a user
        over quota get Dovecot's own replies.
        """
        port = self.procs.relay("--target", f"unix://{self.socket}", "--lmtp", "--hostname", "relay.test")
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            client.sendmail("s@example.org", ["alice"], MESSAGE)
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as unknown:
                client.sendmail("s@example.org", ["nosuchuser"], MESSAGE)
            code, text = unknown.exception.recipients["nosuchuser"]
            self.assertEqual(code, 550)
            self.assertTrue(text.startswith(b"5.1.1 "), text)
            with self.assertRaises(smtplib.SMTPDataError) as full:
                client.sendmail("s@example.org", ["full"], MESSAGE + b"x" * 4096 + b"\r\n")
            self.assertEqual(full.exception.smtp_code, 552)
            self.assertTrue(full.exception.smtp_error.startswith(b"5.2.2 "), full.exception.smtp_error)
        [message] = self.delivered("alice")
        self.assertTrue(message.endswith(MESSAGE.replace(b"\r\n", b"\n")), message[-300:])
        self.assertIn(b"by relay.test (smtprelay) with ESMTP id ", message)

    def test_routedBySenderToDovecotOrSink(self) -> None:
        """
        Routing blocks with real targets: senders in example.org go to
        Dovecot over LMTP (its per-recipient verdicts, one recipient per
        transaction), every other sender to smtp-sink over SMTP.
        """
        sinkPort, dumps = self.procs.smtpSink()
        port = freePort()
        config = os.path.join(self.procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(
                f"hostname relay.test\nsmtp tcp://{HOST}:{port} {{\n"
                f"    source example.org {{ deliver_to lmtp unix://{self.socket} }}\n"
                f"    default_source {{ deliver_to smtp tcp://{HOST}:{sinkPort} }}\n}}\n"
            )
        self.procs.relay("--config", config, port=port)
        with smtplib.SMTP(HOST, port, timeout=60) as client:
            refused = client.sendmail("s@Example.ORG", ["alice", "bob"], MESSAGE)
            self.assertEqual(list(refused), ["bob"])
            self.assertEqual(refused["bob"][0], 452)
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as unknown:
                client.sendmail("s@example.org", ["nosuchuser"], MESSAGE)
            code, text = unknown.exception.recipients["nosuchuser"]
            self.assertEqual((code, text[:6]), (550, b"5.1.1 "))
            self.assertEqual(client.sendmail("s@elsewhere.test", ["bob"], MESSAGE), {})
        [toAlice] = self.delivered("alice")
        self.assertTrue(toAlice.endswith(MESSAGE.replace(b"\r\n", b"\n")), toAlice[-300:])
        [dump] = sinkMessages(dumps)
        envelope = splitSinkDump(dump)[0]
        self.assertEqual((envelope["X-Mail-Args"], envelope["X-Rcpt-Args"]), ([b"<s@elsewhere.test>"], [b"<bob>"]))
        bob = os.path.join(self.dovecot, "mail", "bob", "Maildir", "new")
        self.assertFalse(os.path.isdir(bob) and os.listdir(bob))

    def test_lmtpListenerPerRecipientReplies(self) -> None:
        """
        LMTP client → LMTP listener → Dovecot: one reply per recipient
        after the dot, in RCPT order.
        """
        listen = os.path.join(self.procs.dir, "relay-lmtp.sock")
        config = os.path.join(self.procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"hostname relay.test\nlmtp unix://{listen} {{\n    deliver_to lmtp unix://{self.socket}\n}}\n")
        process = self.procs.start("relay", [os.path.join(os.path.dirname(sys.executable), "twistd"),
                                             "-n", "--pidfile=", "smtprelay", "--config", config])
        waitForPath(listen, process)
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(60)
        client.connect(listen)
        self.addCleanup(client.close)
        reader = client.makefile("rb")
        self.assertTrue(reader.readline().startswith(b"220 "))
        client.sendall(b"LHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        client.sendall(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice>\r\n"
                       b"RCPT TO:<full>\r\nRCPT TO:<bob>\r\nDATA\r\n")
        replies = [reader.readline() for _ in range(5)]
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"250", b"250", b"354"])
        client.sendall(MESSAGE + b"x" * 4096 + b"\r\n.\r\n")
        finals = [reader.readline() for _ in range(3)]
        self.assertEqual([f[:9] for f in finals], [b"250 2.0.0", b"552 5.2.2", b"250 2.0.0"])
        self.assertEqual(len(self.delivered("alice")), 1)
        self.assertEqual(len(self.delivered("bob")), 1)


class SwaksTLSTests(SynchronousTestCase):
    """
    swaks with STARTTLS, AUTH (a local C{users} file) and PIPELINING against
    a running relay, from an address outside C{allow}: only AUTH lets it
    relay.
    """

    def test_starttlsAuthPipelining(self) -> None:
        import bcrypt
        import trustme

        need("swaks")
        if subprocess.run(["perl", "-MNet::SSLeay", "-e1"], capture_output=True).returncode:
            self.skipTest("swaks has no TLS (Debian package libnet-ssleay-perl)")
        self.procs = Processes(self)
        sinkPort, dumps = self.procs.smtpSink()
        ca = trustme.CA()
        leaf = ca.issue_cert("relay.test", HOST)
        cert, key, caFile = (os.path.join(self.procs.dir, n) for n in ("cert.pem", "key.pem", "ca.pem"))
        leaf.private_key_pem.write_to_path(key)
        leaf.cert_chain_pems[0].write_to_path(cert)
        ca.cert_pem.write_to_path(caFile)
        users = os.path.join(self.procs.dir, "users")
        with open(users, "wb") as f:
            f.write(b"alice:" + bcrypt.hashpw(b"correct horse", bcrypt.gensalt(4)) + b"\n")
        os.chmod(users, 0o600)
        port = freePort()
        config = os.path.join(self.procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"hostname relay.test\ntls {cert} {key}\nsmtp tcp://{HOST}:{port} {{\n"
                    f"    allow 192.0.2.0/24\n    auth users {users}\n"
                    f"    deliver_to smtp tcp://{HOST}:{sinkPort}\n}}\n")
        self.procs.relay("--config", config, port=port)
        common = ("--server", f"{HOST}:{port}", "--from", "alice@example.org", "--to", "rcpt@example.net",
                  "--tls", "--tls-ca-path", caFile, "--pipeline")
        denied = swaks(*common)
        self.assertIn(b"<~* 554 5.7.1 Relay access denied", denied.stdout)
        done = swaks(*common, "--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "correct horse")
        self.assertEqual(done.returncode, 0, done.stdout.decode())
        self.assertIn(b"<~  235 2.7.0 Authentication successful", done.stdout)
        self.assertIn(b"<~  250 2.0.0 Ok", done.stdout)
        [dump] = sinkMessages(dumps)
        received = splitSinkDump(dump)[1]
        self.assertIn(b"with ESMTPSA id", received)
        # The client's TLS with its cipher's bits, as Postfix writes it.
        self.assertRegex(received, rb"\(using TLSv1\.3 with cipher \S+ \(\d+/\d+ bits\)\)")


class LogFileTests(SynchronousTestCase):
    """
    The lines a postmaster reads, written by a real relay (NDJSON observer)
    in front of a real smtp-sink that refuses every RCPT.
    """

    def test_refusedRecipientAndFailedAttempt(self) -> None:
        procs = Processes(self)
        sinkPort, dumps = procs.smtpSink(extra=["-f", "RCPT", "-B", "550 5.1.1 <x>: mailbox unavailable here"])
        dead, listen = freePort(), freePort()
        logFile = os.path.join(procs.dir, "events.ndjson")
        relay = procs.start("relay", [TWISTD, "-n", "--pidfile=", "--logger", "smtprelay.observe.logs.jsonObserver",
                                      "smtprelay", "--listen", f"tcp://{HOST}:{listen}",
                                      "--target", f"tcp://{HOST}:{dead}", "--target", f"tcp://{HOST}:{sinkPort}"],
                            env={"SMTPRELAY_LOG_FILE": logFile})
        waitForPort(listen, relay)
        with smtplib.SMTP(HOST, listen, timeout=60) as client:
            client.ehlo("client.test")
            client.mail("sender@example.org")
            code, _ = client.rcpt("rcpt@example.net")
            self.assertEqual(code, 550)

        def events() -> list[dict]:
            with open(logFile, encoding="utf-8") as f:
                return [json.loads(line) for line in f]

        deadline = time.monotonic() + 30
        while not [e for e in events() if e.get("reject")] and time.monotonic() < deadline:
            time.sleep(0.05)
        [attempt] = [e for e in events() if e.get("attempt")]
        [reject] = [e for e in events() if e.get("reject")]
        sessionId = reject["session"]
        self.assertEqual(
            (attempt["session"], attempt["endpoint"], attempt["stage"]),
            (sessionId, f"tcp://{HOST}:{dead}", "connect"),
        )
        self.assertTrue(
            attempt["message"].startswith(
                f"{sessionId}: target command-line: tcp://{HOST}:{dead} failed at connect: connect failed: "
            ),
            attempt["message"],
        )
        self.assertEqual(
            reject["message"],
            f"{sessionId}: reject: RCPT from unknown[{HOST}]: 550 5.1.1 <x>: mailbox unavailable here; "
            f"from=<sender@example.org> to=<rcpt@example.net> proto=ESMTP helo=<client.test> "
            f"relay={HOST}[{HOST}]:{sinkPort}",
        )
        sinkAborted(dumps)
