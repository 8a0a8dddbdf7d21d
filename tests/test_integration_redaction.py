"""
No password in any log line: a real relay with C{debug yes} and the
NDJSON observer, clients authenticating with C{auth forward} (PLAIN and
LOGIN, right and wrong) through STARTTLS to an aiosmtpd downstream that
checks the password.  Every emitted line is searched for the secrets in
every encoding they travel in.
"""

from __future__ import annotations

import base64
import json
import os
import smtplib
import ssl

from twisted.trial.unittest import SynchronousTestCase

from .procs import HOST, TWISTD, Processes, freePort, waitForPort

PASSWORD = "Sw0rdfish-93a7"
WRONG = "Wr0ng-pass-5c1e"


class RedactionTests(SynchronousTestCase):
    def test_noSecretInAnyEvent(self) -> None:
        procs = Processes(self)
        downstream, ca, caFile = procs.aiosmtpd(password=PASSWORD.encode())
        relayCert = ca.issue_cert("relay.test", HOST)
        cert, key = os.path.join(procs.dir, "cert.pem"), os.path.join(procs.dir, "key.pem")
        relayCert.private_key_pem.write_to_path(key)
        relayCert.cert_chain_pems[0].write_to_path(cert)

        listen = freePort()
        config = os.path.join(procs.dir, "relay.conf")
        with open(config, "w") as f:
            f.write(f"""
hostname relay.test
debug yes
tls {cert} {key}
submission tcp://{HOST}:{listen} {{
    auth forward
    deliver_to smtp tcp://{HOST}:{downstream} {{
        tls_client {{
            root_ca {caFile}
            server_name mx.example
        }}
    }}
}}
""")
        os.chmod(config, 0o600)
        logFile = os.path.join(procs.dir, "events.ndjson")
        relay = procs.start("relay", [TWISTD, "-n", "--pidfile=", "--logger", "smtprelay.observe.logs.jsonObserver",
                                      "smtprelay", "--config", config],
                            env={"SMTPRELAY_LOG_FILE": logFile})
        waitForPort(listen, relay)
        context = ssl.create_default_context()
        ca.configure_trust(context)

        def session(mechanism: str, password: str) -> int:
            with smtplib.SMTP(HOST, listen, timeout=60) as client:
                client.starttls(context=context)
                client.ehlo()
                client.user, client.password = "alice", password
                authobject = getattr(client, "auth_" + mechanism.lower())
                try:
                    code = client.auth(mechanism, authobject, initial_response_ok=(mechanism == "PLAIN"))[0]
                except smtplib.SMTPAuthenticationError as e:
                    return e.smtp_code
                client.sendmail("alice@example.org", ["bob@example.net"], b"Subject: r\r\n\r\nbody\r\n")
                return code

        self.assertEqual(session("PLAIN", PASSWORD), 235)
        self.assertEqual(session("LOGIN", PASSWORD), 235)
        self.assertEqual(session("PLAIN", WRONG), 535)
        self.assertEqual(session("LOGIN", WRONG), 535)

        with open(logFile, encoding="utf-8") as f:
            lines = f.read().splitlines()
        events = [json.loads(line) for line in lines]
        self.assertTrue(any(e.get("transaction") and e.get("status") == "sent" for e in events))
        self.assertTrue(any("AUTH" in e.get("message", "") for e in events), "the debug trace shows AUTH")
        forbidden = []
        for secret in (PASSWORD, WRONG):
            raw = secret.encode()
            forbidden += [secret, base64.b64encode(raw).decode(),
                          base64.b64encode(b"\0alice\0" + raw).decode(),
                          base64.b64encode(b"alice\0alice\0" + raw).decode()]
        for line in lines:
            for secret in forbidden:
                self.assertNotIn(secret, line)
        self.assertNotIn(PASSWORD, procs.log("relay"))
