"""
Postfix around a real C{twistd -n smtprelay} on 127.0.0.1: as the client
(a private instance whose C{relayhost} is the relay; it queues what the
relay defers and bounces what it refuses) and as the downstream (a private
instance that stores each message, with STARTTLS and SASL AUTH through
Dovecot).  The instances come from C{tests/postfix-instance.sh}; their
C{maillog} is the witness of what Postfix saw, as a postmaster would read it.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import ssl

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, Certificates, Postfix, Processes, sinkAborted, sinkMessages, waitFor
from .test_integration_relay import splitSinkDump

MESSAGE = (
    b"From: Sender <sender@example.org>\n"
    b"To: Rcpt <rcpt@example.net>\n"
    b"Subject: real peers\n"
    b"\n"
    b"first line\n"
    b".a line that starts with a dot\n"
    b"last line\n"
)

SMTP_MESSAGE = MESSAGE.replace(b"\n", b"\r\n")


def relayThrough(procs: Processes, targetBlock: str, listener: str = "smtp tcp://127.0.0.1:{port}",
                 listenerLines: str = "", top: str = "") -> int:
    """
    A relay whose one listener delivers to the inline SMTP target described
    by C{targetBlock} (its address, then its block's lines); returns the
    listener's port.
    """
    address, _, lines = targetBlock.partition("\n")
    return procs.relayConfig(
        f"hostname relay.test\n{top}\n{listener} {{\n{listenerLines}\n"
        f"    deliver_to smtp {address} {{\n{lines}\n    }}\n}}\n"
    )


class PostfixClientTests(SynchronousTestCase):
    """
    Postfix as the client: C{relayhost = [127.0.0.1]:RELAY}, the relay
    forwarding to Postfix's C{smtp-sink}.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)

    def clientFor(self, relay: int, main: str = "") -> Postfix:
        return self.procs.postfix("client", str(relay), main=main)

    def assertRelayLogged(self, pattern: str) -> None:
        """
        The relay's log has a line matching C{pattern}, as a postmaster
        would look for it.
        """
        waitFor(f"the relay's log line {pattern!r}", lambda: re.search(pattern, self.procs.log("relay")))

    def test_deliveredThroughTheRelay(self) -> None:
        """
        A message to two recipients injected with C{sendmail -C DIR}
        arrives at the sink once, in one transaction with Postfix's
        envelope and our C{Received:} line, and Postfix logs it sent with
        the sink's C{250} as relayed by us.
        """
        sinkPort, dumps = self.procs.smtpSink()
        relay = self.procs.relay("--target", f"tcp://{HOST}:{sinkPort}", "--hostname", "relay.test")
        client = self.clientFor(relay)
        client.sendmail("sender@example.org", ["rcpt@example.net", "other@example.net"], MESSAGE)
        [dump] = sinkMessages(dumps)
        envelope, received, body = splitSinkDump(dump)
        self.assertRegex(envelope["X-Mail-Args"][0], rb"^<sender@example\.org>( |$)")
        self.assertEqual(sorted(r.split(b" ")[0] for r in envelope["X-Rcpt-Args"]),
                         [b"<other@example.net>", b"<rcpt@example.net>"])
        self.assertTrue(received.startswith(f"Received: from client-{client.port}.test ([127.0.0.1])".encode()),
                        received)
        self.assertIn(b"\n" + MESSAGE.split(b"\n\n", 1)[1], body)
        client.waitForLog(rf"to=<(rcpt|other)@example\.net>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{relay}, .*"
                          rf"status=sent \(250 2\.0\.0 ", 2)
        self.assertEqual(client.queue(), [])

    def test_downstreamTemporaryFailureDefersThenDelivers(self) -> None:
        """
        The sink answers RCPT with a 4xx: Postfix keeps the message queued
        with the sink's own text as the reason, and the relay logs the
        rejection as Postfix would; once the sink is back to normal, a queue
        flush delivers it.
        """
        sinkPort, dumps = self.procs.smtpSink(extra=["-r", "RCPT", "-b", "452 4.2.2 rcpt@example.net: mailbox busy"])
        relay = self.procs.relay("--target", f"tcp://{HOST}:{sinkPort}", "--hostname", "relay.test")
        client = self.clientFor(relay)
        client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        # Postfix retries every few seconds meanwhile: the first deferral is the one to read.
        deferred = client.waitForLog(r"to=<rcpt@example\.net>, .*status=deferred \((.*)\)$")[0]
        self.assertEqual(deferred.group(1), f"host 127.0.0.1[127.0.0.1] said: 452 4.2.2 rcpt@example.net: "
                                            f"mailbox busy (in reply to RCPT TO command)")
        [queued] = waitFor("the message in the deferred queue",
                           lambda: [m for m in client.queue() if m["queue_name"] == "deferred"])
        [recipient] = queued["recipients"]
        self.assertEqual(recipient["address"], "rcpt@example.net")
        self.assertIn("452 4.2.2 rcpt@example.net: mailbox busy", recipient["delay_reason"])
        sinkAborted(dumps)
        self.assertNotIn("status=bounced", client.log())
        self.assertRelayLogged(rf": reject: RCPT from unknown\[127\.0\.0\.1\]: 452 4\.2\.2 rcpt@example\.net: "
                               rf"mailbox busy; from=<sender@example\.org> to=<rcpt@example\.net> proto=ESMTP "
                               rf"helo=<client-{client.port}\.test> ")

        self.procs.stop(f"smtp-sink-{sinkPort}")
        _, dumps = self.procs.smtpSink(port=sinkPort)
        client.flush()
        [dump] = sinkMessages(dumps)
        self.assertRegex(splitSinkDump(dump)[0]["X-Rcpt-Args"][0], rb"^<rcpt@example\.net>")
        client.waitForLog(r"to=<rcpt@example\.net>, .*status=sent \(250 2\.0\.0 ")
        self.assertEqual(client.queue(), [])

    def test_downstreamPermanentFailureBounces(self) -> None:
        """
        The sink answers RCPT with a 5xx: Postfix bounces the message at
        once with the sink's own text, and sends the sender a
        non-delivery notification; the relay logs the rejection.
        """
        sinkPort, dumps = self.procs.smtpSink(
            extra=["-f", "RCPT", "-B", "550 5.1.1 rcpt@example.net: no such user here"])
        relay = self.procs.relay("--target", f"tcp://{HOST}:{sinkPort}", "--hostname", "relay.test")
        client = self.clientFor(relay)
        client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        [bounced] = client.waitForLog(r"to=<rcpt@example\.net>, .*status=bounced \((.*)\)$")
        self.assertEqual(bounced.group(1), "host 127.0.0.1[127.0.0.1] said: 550 5.1.1 rcpt@example.net: "
                                           "no such user here (in reply to RCPT TO command)")
        client.waitForLog(r": sender non-delivery notification: ")
        self.assertRelayLogged(r": reject: RCPT from unknown\[127\.0\.0\.1\]: 550 5\.1\.1 rcpt@example\.net: "
                               r"no such user here; from=<sender@example\.org> to=<rcpt@example\.net> ")
        self.assertNotIn("status=deferred", client.log())
        sinkAborted(dumps)

    def test_starttlsFromPostfixToTheRelay(self) -> None:
        """
        With C{smtp_tls_security_level = encrypt} Postfix delivers only
        over TLS: it logs the TLS session to the relay, and our
        C{Received:} line records it (ESMTPS, the protocol and cipher).
        """
        sinkPort, dumps = self.procs.smtpSink()
        pki = self.procs.certificates("relay.test", HOST)
        relay = self.procs.relayConfig(
            f"hostname relay.test\ntls {pki.cert} {pki.key}\n"
            f"smtp tcp://{HOST}:{{port}} {{\n    deliver_to smtp tcp://{HOST}:{sinkPort}\n}}\n"
        )
        client = self.clientFor(relay, main="smtp_tls_security_level = encrypt")
        client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        [dump] = sinkMessages(dumps)
        received = splitSinkDump(dump)[1]
        self.assertIn(b"(using TLSv1.3 with cipher ", received)
        self.assertIn(b" with ESMTPS id ", received)
        client.waitForLog(rf"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{relay}: TLSv1\.3 with cipher ")
        client.waitForLog(r"to=<rcpt@example\.net>, .*status=sent \(250 2\.0\.0 ")


class PostfixDownstreamTLSTests(SynchronousTestCase):
    """
    Postfix as the downstream, offering STARTTLS; C{smtplib} as the client
    of the relay.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)

    def send(self, relay: int) -> dict:
        with smtplib.SMTP(HOST, relay, local_hostname="client.test", timeout=60) as client:
            return client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE)

    def assertArrivedEncrypted(self, downstream: Postfix, relay: int, trust: str) -> bytes:
        """
        One message is stored, and Postfix's C{Received:} line and log say
        that the relay delivered it over TLS; the relay's transaction log
        line labels that TLS C{trust} (C{verified} or C{untrusted}).
        """
        line = waitFor("the relay's transaction log line", lambda: re.search(
            r" from=<sender@example\.org> to=1 .* tls=(\S+) .* status=sent ", self.procs.log(f"relay-{relay}")))
        self.assertEqual(line.group(1), trust)
        [stored] = downstream.stored()
        self.assertRegex(stored, rb"\nReceived: from relay\.test \(localhost \[127\.0\.0\.1\]\)\n"
                                 rb"\t\(using TLSv1\.3 with cipher [^\n]*\n(\t[^\n]*\n)*?"
                                 rb"\tby downstream-\d+\.test \(Postfix\) with ESMTPS id ")
        self.assertIn(b"\nSubject: real peers\n", stored)
        downstream.waitForLog(r"TLS connection established from localhost\[127\.0\.0\.1\]: TLSv1\.3 with cipher ")
        return stored

    def test_opportunisticTLSWithSelfSignedCertificate(self) -> None:
        """
        A downstream whose certificate cannot be verified (self-signed)
        still gets the message encrypted under opportunistic TLS (the
        default C{attempt_starttls yes}, C{require_tls no}), as Postfix's
        C{may} level does; the relay logs the TLS as untrusted.
        """
        cert = self.procs.selfSigned("downstream.test")
        downstream = self.procs.postfix("downstream", cert.cert, cert.key)
        relay = relayThrough(self.procs, f"tcp://{HOST}:{downstream.port}")
        self.assertEqual(self.send(relay), {})
        self.assertArrivedEncrypted(downstream, relay, "untrusted")

    def test_requiredTLSWithTrustedCertificate(self) -> None:
        """
        With the downstream's CA as C{root_ca} and C{require_tls yes}
        (which accepts only a verified certificate), the message arrives
        encrypted, and the relay logs the TLS as verified.
        """
        pki = self.procs.certificates(HOST)
        downstream = self.procs.postfix("downstream", pki.cert, pki.key)
        relay = relayThrough(self.procs, f"tcp://{HOST}:{downstream.port}\n"
                                         f"require_tls yes\ntls_client {{\nroot_ca {pki.ca}\n}}")
        self.assertEqual(self.send(relay), {})
        self.assertArrivedEncrypted(downstream, relay, "verified")

    def test_requiredTLSWithUntrustedCertificate(self) -> None:
        """
        C{require_tls yes} and a self-signed certificate: the client gets
        C{451 4.7.5} at MAIL and the downstream never sees a transaction.
        """
        cert = self.procs.selfSigned("downstream.test")
        downstream = self.procs.postfix("downstream", cert.cert, cert.key)
        relay = relayThrough(self.procs, f"tcp://{HOST}:{downstream.port}\nrequire_tls yes")
        with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
            self.send(relay)
        self.assertEqual(refused.exception.smtp_code, 451)
        self.assertTrue(refused.exception.smtp_error.startswith(b"4.7.5 "), refused.exception.smtp_error)
        self.assertEqual(os.listdir(os.path.join(downstream.dir, "mail")), [])
        self.assertNotIn("from=<sender@example.org>", downstream.log())


class PostfixDownstreamSASLTests(SynchronousTestCase):
    """
    Postfix as the downstream with STARTTLS (a certificate the relay
    trusts) and SASL AUTH checked by Dovecot: it relays only for
    authenticated clients.  Dovecot's users have the password C{x}.
    """

    def setUp(self) -> None:
        self.procs = Processes(self)
        self.pki = self.procs.certificates("relay.test", HOST)
        self.downstream = self.saslDownstream(self.pki)
        self.target = f"tcp://{HOST}:{self.downstream.port}\ntls_client {{\nroot_ca {self.pki.ca}\n}}"

    def saslDownstream(self, pki: Certificates) -> Postfix:
        """
        A Postfix downstream with C{pki}'s certificate that relays only for
        clients authenticated by a new Dovecot.
        """
        return self.procs.postfix("downstream", pki.cert, pki.key, main=(
            "smtpd_sasl_auth_enable = yes\n"
            "smtpd_sasl_type = dovecot\n"
            f"smtpd_sasl_path = {self.procs.dovecot()}/auth\n"
            "smtpd_tls_auth_only = yes\n"
            "mynetworks = 127.0.0.2/32\n"
            "smtpd_recipient_restrictions = permit_sasl_authenticated, reject\n"
        ))

    def relayWithPassword(self, password: str) -> int:
        return relayThrough(self.procs, f"{self.target}\nauth plain alice {password}")

    def assertNothingStored(self) -> None:
        self.assertEqual(os.listdir(os.path.join(self.downstream.dir, "mail")), [])
        self.assertNotIn("from=<sender@example.org>", self.downstream.log())

    def test_relayCredentialsAccepted(self) -> None:
        """
        C{auth plain alice x}: Dovecot accepts, Postfix relays for alice
        and stores the message.
        """
        with smtplib.SMTP(HOST, self.relayWithPassword("x"), timeout=60) as client:
            self.assertEqual(client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE), {})
        [stored] = self.downstream.stored()
        self.assertIn(b"\nSubject: real peers\n", stored)
        self.downstream.waitForLog(r"client=localhost\[127\.0\.0\.1\], sasl_method=PLAIN, sasl_username=alice$")

    def test_relayCredentialsRefusedIsTemporary(self) -> None:
        """
        The relay's own password is wrong (Postfix answers C{535}): a fault
        of the relay's configuration, not of the message, so the client
        gets a 4xx at MAIL, never the 535; the relay logs an error naming
        the target, the downstream and its reply.
        """
        relay = self.relayWithPassword("wrong")
        with smtplib.SMTP(HOST, relay, timeout=60) as client:
            with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE)
        self.assertEqual(refused.exception.smtp_code // 100, 4, refused.exception.smtp_error)
        self.downstream.waitForLog(r"SASL PLAIN authentication failed")
        self.assertNothingStored()
        waitFor("the relay's error naming the target", lambda: re.search(
            rf"#error\] target \S+: cannot authenticate at 127\.0\.0\.1\[127\.0\.0\.1\]:{self.downstream.port}: "
            rf"PLAIN authentication refused: 535 ",
            self.procs.log(f"relay-{relay}")))

    def test_relayCredentialsNeverOverUnverifiedTLS(self) -> None:
        """
        A downstream with a self-signed certificate: the relay may encrypt
        to it, but never sends it the password (the certificate could be a
        man in the middle's); the client gets a 4xx at MAIL and Postfix's
        session summary shows no AUTH command.
        """
        downstream = self.saslDownstream(self.procs.selfSigned("downstream.test"))
        relay = relayThrough(self.procs, f"tcp://{HOST}:{downstream.port}\nauth plain alice x")
        with smtplib.SMTP(HOST, relay, timeout=60) as client:
            with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE)
        self.assertEqual(refused.exception.smtp_code // 100, 4, refused.exception.smtp_error)
        summaries = downstream.waitForLog(r"disconnect from localhost\[127\.0\.0\.1\] (ehlo=.*)$")
        self.assertNotIn("auth=", " ".join(m.group(1) for m in summaries))
        self.assertEqual(os.listdir(os.path.join(downstream.dir, "mail")), [])

    def test_relayCredentialsWithoutAUTHOfferedIsTemporary(self) -> None:
        """
        A downstream (verified TLS) that offers no AUTH while the relay is
        configured with credentials: a fault of the configuration, so the
        client gets a 4xx at MAIL and nothing is sent.
        """
        plain = self.procs.postfix("downstream", self.pki.cert, self.pki.key)
        relay = relayThrough(self.procs, f"tcp://{HOST}:{plain.port}\ntls_client {{\nroot_ca {self.pki.ca}\n}}\n"
                                         "auth plain alice x")
        with smtplib.SMTP(HOST, relay, timeout=60) as client:
            with self.assertRaises(smtplib.SMTPSenderRefused) as refused:
                client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE)
        self.assertEqual(refused.exception.smtp_code // 100, 4, refused.exception.smtp_error)
        self.assertEqual(os.listdir(os.path.join(plain.dir, "mail")), [])
        self.assertNotIn("from=<sender@example.org>", plain.log())

    def test_postfixClientDefersOnRelayCredentialFailure(self) -> None:
        """
        Postfix as the client of a relay whose password is wrong keeps the
        message queued (deferred), and bounces nothing.
        """
        client = self.procs.postfix("client", str(self.relayWithPassword("wrong")))
        client.sendmail("sender@example.org", ["rcpt@example.net"], MESSAGE)
        deferred = client.waitForLog(r"to=<rcpt@example\.net>, .*status=(deferred|bounced) \((.*)\)$")[0]
        self.assertEqual(deferred.group(1), "deferred", deferred.group(2))
        self.assertRegex(deferred.group(2), r"^host 127\.0\.0\.1\[127\.0\.0\.1\] said: 454 4\.7\.0 ")
        self.assertEqual([m["recipients"][0]["address"] for m in client.queue()], ["rcpt@example.net"])
        self.assertNothingStored()

    def forwardingRelay(self) -> int:
        """
        A submission listener with C{auth forward}: the client's own
        credentials go to the downstream.
        """
        return relayThrough(self.procs, self.target, listener="submission tcp://127.0.0.1:{port}",
                            listenerLines="    auth forward", top=f"tls {self.pki.cert} {self.pki.key}")

    def forwardingClient(self) -> smtplib.SMTP:
        client = smtplib.SMTP(HOST, self.forwardingRelay(), local_hostname="client.test", timeout=60)
        self.addCleanup(client.close)
        client.starttls(context=ssl.create_default_context(cafile=self.pki.ca))
        return client

    def test_forwardedCredentialsAccepted(self) -> None:
        """
        C{auth forward}: the client's C{alice}/C{x} are checked by the
        downstream (Dovecot), which then relays for alice.
        """
        client = self.forwardingClient()
        self.assertEqual(client.login("alice", "x")[0], 235)
        self.assertEqual(client.sendmail("sender@example.org", ["rcpt@example.net"], SMTP_MESSAGE), {})
        client.quit()
        [stored] = self.downstream.stored()
        self.assertIn(b"\nSubject: real peers\n", stored)
        self.downstream.waitForLog(r"sasl_method=PLAIN, sasl_username=alice$")

    def test_forwardedCredentialsRefused(self) -> None:
        """
        C{auth forward} with a wrong password: the downstream's own C{535}
        (Postfix's text, not ours) reaches the client; they are the
        client's credentials.
        """
        client = self.forwardingClient()
        with self.assertRaises(smtplib.SMTPAuthenticationError) as refused:
            client.login("alice", "wrong")
        self.assertEqual(refused.exception.smtp_code, 535)
        self.assertTrue(refused.exception.smtp_error.startswith(b"5.7.8 Error: authentication failed: "),
                        refused.exception.smtp_error)
        self.assertNothingStored()


def proxiedSession(relay: int, commands: list[bytes], body: bytes = b"") -> list[bytes]:
    """
    One SMTP session with the relay whose PROXY v1 header says the client
    is 198.51.100.7:51234 (the relay sees that address, not 127.0.0.1);
    returns the first line of each reply to C{commands}, then to C{body}
    (sent after a C{354}).
    """
    with socket.create_connection((HOST, relay), timeout=60) as s:
        s.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 25\r\n")
        reader = s.makefile("rb")

        def reply() -> bytes:
            line = reader.readline()
            while line[3:4] == b"-":
                line = reader.readline()
            return line.rstrip(b"\r\n")

        assert reply().startswith(b"220 ")
        replies = []
        for command in commands:
            s.sendall(command + b"\r\n")
            replies.append(reply())
            if replies[-1][:3] == b"354":
                s.sendall(body + b".\r\n")
                replies.append(reply())
        s.sendall(b"QUIT\r\n")
        reply()
        return replies


class PostfixDownstreamClientInfoTests(SynchronousTestCase):
    """
    C{forward_client_info}: Postfix as a downstream that trusts the relay
    with XFORWARD or XCLIENT logs, and applies its policies to, the relay's
    client (here 198.51.100.7 by the PROXY protocol) instead of the relay.
    """

    COMMANDS = [b"EHLO proxied.test", b"MAIL FROM:<sender@example.org>", b"RCPT TO:<rcpt@example.net>", b"DATA"]

    def setUp(self) -> None:
        self.procs = Processes(self)

    def relayTo(self, downstream: Postfix, mode: str) -> int:
        return relayThrough(
            self.procs, f"tcp://{HOST}:{downstream.port}\nforward_client_info {mode}",
            listenerLines="    proxy_protocol 127.0.0.0/8\n    allow 198.51.100.0/24",
        )

    def test_xforward(self) -> None:
        """
        XFORWARD: Postfix logs the original client beside the relay, and the
        relay's session id (in the relay's C{Received:} line) as the
        original queue id.
        """
        downstream = self.procs.postfix("downstream", main="smtpd_authorized_xforward_hosts = 127.0.0.0/8")
        relay = self.relayTo(downstream, "xforward")
        replies = proxiedSession(relay, self.COMMANDS, SMTP_MESSAGE)
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"250", b"354", b"250"])
        [stored] = downstream.stored()
        session = re.search(rb"\nReceived: from proxied\.test \(\[198\.51\.100\.7\]\)\n"
                            rb"\tby relay\.test \(smtprelay\) with ESMTP id (\w+)\n", stored)
        assert session is not None, stored
        downstream.waitForLog(rf": client=localhost\[127\.0\.0\.1\], orig_queue_id={session.group(1).decode()}, "
                              rf"orig_client=unknown\[198\.51\.100\.7\]$")

    def test_xclient(self) -> None:
        """
        XCLIENT: Postfix's policy applies to the original client, which is
        outside its C{mynetworks}: its C{554} refusal reaches the client and
        its log names the client, not the relay.
        """
        downstream = self.procs.postfix("downstream", main="smtpd_authorized_xclient_hosts = 127.0.0.0/8")
        relay = self.relayTo(downstream, "xclient")
        replies = proxiedSession(relay, self.COMMANDS[:3])
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"554"])
        self.assertEqual(replies[2], b"554 5.7.1 <rcpt@example.net>: Recipient address rejected: Access denied")
        downstream.waitForLog(r"NOQUEUE: reject: RCPT from unknown\[198\.51\.100\.7\]: 554 5\.7\.1 "
                              r"<rcpt@example\.net>: Recipient address rejected: Access denied; .* helo=<proxied\.test>")
