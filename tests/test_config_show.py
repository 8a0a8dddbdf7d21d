"""
Tests for L{smtprelay.config.show}: the effective configuration, and for
L{smtprelay.config.secretFileWarnings}.
"""

from __future__ import annotations

import os

import attrs
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config import loadString, secretFileWarnings, show
from smtprelay.config.model import DownstreamAuth, Secret

FULL = """\
hostname relay.example.org
debug yes
tls /c.pem /k.pem {
    protocols tls1.2 tls1.3
    ciphers ECDHE-RSA-AES128-GCM-SHA256 ECDHE-RSA-AES256-GCM-SHA384
    client_ca /ca.pem
}
tls_client {
    root_ca "/my certs/ca.pem" /b.pem
    server_name mx.example.net
    curves X25519
}
metrics tcp://127.0.0.1:9749
shutdown_timeout 1m30s
probe_interval 10s

smtp tcp://0.0.0.0:25 tcp://[::]:25 {
    allow 10.0.0.0/8 ::1
    max_message_size 10M
    max_recipients 200
    max_message_rate 100
    rate_limit_window 5m
    read_timeout 250ms
    proxy_protocol 10.9.0.0/16
    bare_lf normalize
    endpoint "systemd:domain=INET:index=0"
    deliver_to &smarthost
}
submission tls://0.0.0.0:465 {
    auth forward
    tls /c3.pem /k3.pem
    deliver_to smtp tls://smtp.example.net:465 {
        hostname bücher.example
        data_timeout 1m
    }
}
submission tcp://0.0.0.0:587 {
    auth forward
    deliver_to &smarthost
}
lmtp unix:///run/lmtp.sock {
    auth users "/etc/smtprelay/users file"
    tls off
    deliver_to &dovecot
}
target.smtp smarthost {
    targets tcp://mx1.example.net:587
    tls_client {
        cert /client.pem
        key /client.key
        insecure_skip_verify
    }
    attempt_starttls no
    backoff 0
    forward_client_info xforward
}
target.lmtp dovecot {
    targets unix:/run/dovecot/lmtp
    lmtp_split tempfail
}
"""

ROUTING = """\
target.smtp corp {
    targets tcp://127.0.0.1:2601
}
smtp tcp://0.0.0.0:25 {
    source example.org Boss@Example.COM { deliver_to &corp }
    source lists.test {
        destination x.test { deliver_to smtp tcp://127.0.0.1:2603 }
        default_destination { reject 550 5.1.2 "unknown domain" }
    }
    destination a.test b.test { deliver_to smtp tcp://127.0.0.1:2604 }
    destination c.test { deliver_to smtp tcp://127.0.0.1:2605 }
    default_destination { deliver_to &corp }
}
"""


class ShowTests(SynchronousTestCase):
    def test_roundTrip(self) -> None:
        """
        Parsing the output again gives the same configuration.
        """
        config = loadString(FULL, "relay.conf", {})
        shown = show(config)
        self.assertEqual(loadString(shown, "relay.conf", {}), config)

    def test_routingRoundTrip(self) -> None:
        """
        Routing blocks are written back as blocks, rules that share a
        decision in one head, so that inline targets keep their names.
        """
        config = loadString(ROUTING, "relay.conf", {})
        shown = show(config)
        self.assertEqual(loadString(shown, "relay.conf", {}), config)
        self.assertIn("    source example.org boss@example.com {\n        deliver_to &corp\n    }\n", shown)
        self.assertIn('            reject 550 5.1.2 "unknown domain"\n', shown)
        self.assertIn("    destination a.test b.test {\n        deliver_to smtp {\n", shown)
        self.assertIn("    default_destination {\n        deliver_to &corp\n    }\n", shown)

    def test_defaultsFilledIn(self) -> None:
        config = loadString(
            "hostname h\nsmtp tcp://127.0.0.1:25 {\ndeliver_to lmtp unix:/x\n}\n", "relay.conf", {}
        )
        shown = show(config)
        for line in [
            "hostname h",
            "debug no",
            "tls off",
            "shutdown_timeout 30s",
            "probe_interval 30s",
            "    allow 127.0.0.0/8 ::1/128",
            "    max_message_size 32M",
            "    max_recipients 1000",
            "    read_timeout 5m",
            "    data_timeout 10m",
            "    bare_lf reject",
            "    rate_limit_window 1m",
            "    max_connection_rate 0",
            "    deliver_to lmtp {",
            "        targets unix:///x",
            "        attempt_starttls no",
            "        submission_timeout 12m",
            "        lmtp_split one_rcpt",
            "        backoff 30s",
            "        forward_client_info off",
        ]:
            self.assertIn(line + "\n", shown)
        self.assertEqual(loadString(shown, "relay.conf", {}), config)

    def test_quoting(self) -> None:
        config = loadString(FULL, "relay.conf", {})
        shown = show(config)
        self.assertIn('root_ca "/my certs/ca.pem" /b.pem\n', shown)
        self.assertIn('auth users "/etc/smtprelay/users file"\n', shown)
        self.assertIn("endpoint systemd:domain=INET:index=0\n", shown)

    def test_namedTargets(self) -> None:
        """
        Listeners refer to named targets by name, also when their
        C{auth forward} changed the target's auth.
        """
        shown = show(loadString(FULL, "relay.conf", {}))
        self.assertEqual(shown.count("deliver_to &smarthost\n"), 2)
        self.assertIn("deliver_to &dovecot\n", shown)
        self.assertIn("target.lmtp dovecot {\n", shown)

    def test_secretsMasked(self) -> None:
        """
        Passwords are shown as C{****}; parsing that gives C{****} back.
        """
        text = FULL.replace(
            "    lmtp_split tempfail\n", "    lmtp_split tempfail\n    auth login user hunter2\n"
        )
        config = loadString(text, "relay.conf", {})
        shown = show(config)
        self.assertNotIn("hunter2", shown)
        self.assertIn("    auth login user ****\n", shown)
        masked = attrs.evolve(
            config.targets[1], auth=DownstreamAuth("login", "user", Secret("****"))
        )
        self.assertEqual(loadString(shown, "relay.conf", {}).targets[1], masked)


class SecretFileWarningTests(SynchronousTestCase):
    """
    L{secretFileWarnings} names secret files that others may read.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, text: str, mode: int) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, mode)
        return path

    def config(self, children: str, mode: int = 0o600) -> str:
        return self.write(
            "relay.conf",
            "smtp tcp://127.0.0.1:25 {\ndeliver_to smtp tcp://x:25 {\n" + children + "\n}\n}\n",
            mode,
        )

    def test_inlinePassword(self) -> None:
        path = self.config("auth plain u hunter2", 0o644)
        self.assertEqual(
            secretFileWarnings(path),
            [f"warning: {path} holds secrets and is world-readable (0644); chmod 600 it"],
        )

    def test_groupReadable(self) -> None:
        path = self.config("auth plain u hunter2", 0o640)
        self.assertEqual(
            secretFileWarnings(path),
            [f"warning: {path} holds secrets and is group-readable (0640); chmod 600 it"],
        )

    def test_private(self) -> None:
        self.assertEqual(secretFileWarnings(self.config("auth plain u hunter2", 0o600)), [])

    def test_noPassword(self) -> None:
        self.assertEqual(secretFileWarnings(self.config("auth forward", 0o644)), [])

    def test_envPassword(self) -> None:
        """
        A password from the environment is not in the file.
        """
        self.assertEqual(secretFileWarnings(self.config("auth plain u {env:PW}", 0o644)), [])

    def test_eachFileOnce(self) -> None:
        """
        A secret file is named once however many listeners, targets or
        spellings refer to it; a configuration with inline passwords in
        several targets once.
        """
        key = self.write("key.pem", "k", 0o644)
        spelled = os.path.join(self.dir, ".", "key.pem")
        path = self.write("relay.conf", f"""
tls c.pem {key}
smtp tcp://127.0.0.1:25 {{
    tls c.pem {spelled}
    deliver_to smtp tcp://x:25 {{
        auth plain u hunter2
    }}
}}
smtp tcp://127.0.0.1:26 {{
    deliver_to smtp tcp://y:25 {{
        auth plain v hunter3
    }}
}}
""", 0o644)
        self.assertEqual(
            secretFileWarnings(path),
            [f"warning: {key} holds secrets and is world-readable (0644); chmod 600 it",
             f"warning: {path} holds secrets and is world-readable (0644); chmod 600 it"],
        )

    def test_passwordFile(self) -> None:
        secret = self.write("pw", "hunter2\n", 0o604)
        path = self.config(f"auth plain u file:{secret}", 0o644)
        self.assertEqual(
            secretFileWarnings(path),
            [f"warning: {secret} holds secrets and is world-readable (0604); chmod 600 it"],
        )

    def test_usersAndKeys(self) -> None:
        users = self.write("users", "u:$2b$...\n", 0o644)
        serverKey = self.write("server.key", "", 0o640)
        clientKey = self.write("client.key", "", 0o600)
        path = self.write(
            "relay.conf",
            f"tls /c {serverKey}\n"
            f"smtp tcp://127.0.0.1:25 {{\nauth users {users}\n"
            f"deliver_to smtp tcp://x:25 {{\ntls_client {{\ncert /c\nkey {clientKey}\n}}\n}}\n}}\n",
            0o644,
        )
        self.assertEqual(
            secretFileWarnings(path),
            [
                f"warning: {serverKey} holds secrets and is group-readable (0640); chmod 600 it",
                f"warning: {users} holds secrets and is world-readable (0644); chmod 600 it",
            ],
        )

    def test_imported(self) -> None:
        """
        The file named is the one holding the password.
        """
        part = self.write("part.conf", "auth plain u hunter2\n", 0o644)
        path = self.config("import part", 0o600)
        self.assertEqual(
            secretFileWarnings(path),
            [f"warning: {part} holds secrets and is world-readable (0644); chmod 600 it"],
        )

    def test_unreadable(self) -> None:
        """
        Missing or broken configurations give no warnings (the loader
        reports them).
        """
        self.assertEqual(secretFileWarnings(os.path.join(self.dir, "nope")), [])
        self.assertEqual(secretFileWarnings(self.write("bad", "a {\n", 0o644)), [])
