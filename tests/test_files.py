"""
Tests for L{smtprelay.app.files}: every file a configuration names is loaded
as the relay loads it, and each problem is one line naming the directive,
the file and the reason.
"""

from __future__ import annotations

import os

import bcrypt
import trustme
from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config import loadString
from smtprelay.config.model import Address, Config, Listener, ServerTLS, Target
from smtprelay.app.files import fileErrors

LISTENER = "smtp tcp://127.0.0.1:2525 {{\n{inner}    deliver_to smtp tcp://127.0.0.1:2526{target}\n}}\n"


class FileErrorsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = trustme.CA()
        leaf = self.ca.issue_cert("relay.test")
        self.cert = self.write("cert.pem", b"".join(p.bytes() for p in leaf.cert_chain_pems))
        self.key = self.write("key.pem", leaf.private_key_pem.bytes())
        self.caFile = self.write("ca.pem", self.ca.cert_pem.bytes())
        self.missing = os.path.join(self.dir, "missing.pem")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def errors(self, top: str = "", inner: str = "", target: str = "") -> list[str]:
        """
        The file errors of a configuration C{relay.conf} with C{top} lines,
        one listener with C{inner} lines and an inline target with a
        C{target} block.
        """
        text = f"hostname relay.test\n{top}" + LISTENER.format(inner=inner, target=target)
        return fileErrors(loadString(text, "relay.conf"))

    def test_allLoad(self) -> None:
        users = self.write("users", f"alice:{bcrypt.hashpw(b'x', bcrypt.gensalt(4)).decode()}\n".encode())
        self.assertEqual(
            self.errors(
                top=f"tls {self.cert} {self.key} {{\n    client_ca {self.caFile}\n}}\n",
                inner=f"    auth users {users}\n",
                target=f" {{\n        tls_client {{\n            root_ca {self.caFile}\n"
                f"            cert {self.cert}\n            key {self.key}\n        }}\n    }}",
            ),
            [],
        )

    def test_missingCertificate(self) -> None:
        """
        A missing file: the directive's C{FILE:LINE}, the path and the
        system's reason.
        """
        self.assertEqual(
            self.errors(top=f"tls {self.missing} {self.key}\n"),
            [f"relay.conf:2: tls: {self.missing}: cannot read: No such file or directory"],
        )

    def test_unreadable(self) -> None:
        """
        A path that exists but cannot be read as a file (the test runs as
        root, for whom permissions do not stop a read).
        """
        self.assertEqual(
            self.errors(inner=f"    tls {self.dir} {self.key}\n"),
            [f"relay.conf:3: tls: {self.dir}: cannot read: Is a directory"],
        )

    def test_missingKey(self) -> None:
        self.assertEqual(
            self.errors(top=f"tls {self.cert} {self.missing}\n"),
            [f"relay.conf:2: tls: {self.missing}: cannot read: No such file or directory"],
        )

    def test_notPEM(self) -> None:
        """
        A certificate file without a PEM certificate, a PEM block that does
        not decode, a key file without a key.
        """
        text = self.write("text.pem", b"hello\n")
        broken = self.write("broken.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        self.assertEqual(
            self.errors(top=f"tls {text} {self.key}\n"),
            [f"relay.conf:2: tls: {text}: no PEM certificate found"],
        )
        self.assertEqual(
            self.errors(top=f"tls {broken} {self.key}\n"),
            [f"relay.conf:2: tls: {broken}: not a valid PEM certificate"],
        )
        self.assertEqual(
            self.errors(top=f"tls {self.cert} {self.cert}\n"),
            [f"relay.conf:2: tls: {self.cert}: not an unencrypted PEM private key"],
        )

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused at once: it does not prompt for a
        passphrase on the terminal.
        """
        with open(self.key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = self.write("encrypted.pem", key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ))
        self.assertEqual(
            self.errors(top=f"tls {self.cert} {encrypted}\n"),
            [f"relay.conf:2: tls: {encrypted}: not an unencrypted PEM private key"],
        )

    def test_keyMismatch(self) -> None:
        other = self.write("other.key", self.ca.issue_cert("other.test").private_key_pem.bytes())
        self.assertEqual(
            self.errors(top=f"tls {self.cert} {other}\n"),
            [f"relay.conf:2: tls: {other}: does not match the certificate in {self.cert}"],
        )

    def test_clientCA(self) -> None:
        self.assertEqual(
            self.errors(top=f"tls {self.cert} {self.key} {{\n    client_ca {self.missing}\n}}\n"),
            [f"relay.conf:2: tls: {self.missing}: cannot read: No such file or directory"],
        )

    def test_tlsClient(self) -> None:
        """
        A target's C{tls_client} files: root CAs, client certificate and
        key, reported at the block's line; the global block too.
        """
        other = self.write("other.key", self.ca.issue_cert("other.test").private_key_pem.bytes())
        self.assertEqual(
            self.errors(target=f" {{\n        tls_client {{\n            root_ca {self.caFile} {self.missing}\n        }}\n    }}"),
            [f"relay.conf:4: tls_client: {self.missing}: cannot read: No such file or directory"],
        )
        self.assertEqual(
            self.errors(target=f" {{\n        tls_client {{\n            cert {self.cert}\n            key {other}\n"
                               "        }\n    }"),
            [f"relay.conf:4: tls_client: {other}: does not match the certificate in {self.cert}"],
        )
        self.assertEqual(
            self.errors(top=f"tls_client {{\n    root_ca {self.missing}\n}}\n"),
            [f"relay.conf:2: tls_client: {self.missing}: cannot read: No such file or directory"],
        )

    def test_usersFile(self) -> None:
        malformed = self.write("users", b"alice:plaintext\n")
        self.assertEqual(
            self.errors(inner=f"    auth users {self.missing}\n"),
            [f"relay.conf:3: auth: {self.missing}: cannot read: No such file or directory"],
        )
        self.assertEqual(
            self.errors(inner=f"    auth users {malformed}\n"),
            [f"relay.conf:3: auth: {malformed}:1: expected user:$2b$... (a bcrypt hash)"],
        )

    def test_sharedSettingOnce(self) -> None:
        """
        The global C{tls} of two listeners is one problem, one line.
        """
        text = (
            f"hostname relay.test\ntls {self.missing} {self.key}\n"
            + LISTENER.format(inner="", target="")
            + LISTENER.format(inner="", target="").replace("2525", "2527")
        )
        self.assertEqual(
            fileErrors(loadString(text, "relay.conf")),
            [f"relay.conf:2: tls: {self.missing}: cannot read: No such file or directory"],
        )

    def test_withoutOrigin(self) -> None:
        """
        A configuration built in code has no C{FILE:LINE}: the line starts
        with the directive.
        """
        target = Target("t", "smtp", (Address("tcp", "127.0.0.1", 2526),))
        config = Config(
            hostname="relay.test",
            listeners=(Listener("smtp", (Address("tcp", "127.0.0.1", 2525),), target,
                                tls=ServerTLS(self.missing, self.key)),),
        )
        self.assertEqual(
            fileErrors(config), [f"tls: {self.missing}: cannot read: No such file or directory"]
        )
