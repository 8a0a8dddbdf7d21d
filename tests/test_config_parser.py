"""
Tests for L{smtprelay.config.parser}: every directive, its default and its
errors, and the configuration as a whole.
"""

from __future__ import annotations

import ipaddress
import socket
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config import ConfigError, load, loadString, parser
from smtprelay.config.model import (
    LOOPBACK,
    Address,
    ClientTLS,
    Config,
    Destinations,
    DownstreamAuth,
    Listener,
    ListenerAuth,
    Reject,
    Routing,
    Secret,
    ServerTLS,
    Target,
)

EXAMPLE = """\
hostname relay.example.org
tls /etc/smtprelay/fullchain.pem /etc/smtprelay/privkey.pem

smtp tcp://0.0.0.0:25 {
    allow 127.0.0.0/8 ::1/128 10.0.0.0/8
    max_message_size 32M
    deliver_to &smarthost
}

submission tcp://0.0.0.0:587 {
    auth forward
    deliver_to smtp tls://smtp.example.net:465
}

lmtp unix:///run/smtprelay/lmtp.sock {
    deliver_to lmtp unix:///run/dovecot/lmtp
}

target.smtp smarthost {
    targets tcp://mx1.example.net:587 tcp://mx2.example.net:587
    auth plain relay-user {env:SMARTHOST_PASSWORD}
    require_tls yes
    tls_client {
        root_ca /etc/smtprelay/corp-ca.pem
    }
    connect_timeout 30s
}

metrics tcp://127.0.0.1:9749
"""

DOWN = Address("tcp", host="127.0.0.1", port=2526)


def _load(text: str, env: Mapping[str, str] | None = None) -> Config:
    return loadString(text, "relay.conf", env or {})


def _errors(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    try:
        _load(text, env)
    except ConfigError as e:
        return e.errors
    raise AssertionError("no ConfigError")


def _listen(
    *children: str,
    head: str = "smtp tcp://127.0.0.1:2525",
    top: str = "",
    hostname: str = "relay.test",
) -> str:
    """
    A configuration with C{hostname} on line 1 and one listener made of
    C{children} (lines 3 on), delivering inline to L{DOWN} unless the
    children say otherwise, followed by C{top}.
    """
    body = list(children)
    if not any(line.startswith("deliver_to") for line in children):
        body.append("deliver_to smtp tcp://127.0.0.1:2526")
    return f"hostname {hostname}\n{head} {{\n" + "\n".join(body) + "\n}\n" + top


def _listener(*children: str, **kw: Any) -> Listener:
    [listener] = _load(_listen(*children, **kw)).listeners
    return listener


def _deliveredTo(listener: Listener) -> Target:
    """
    The one target of C{listener}, which must not route.
    """
    target = listener.deliverTo
    if not isinstance(target, Target):
        raise AssertionError(f"{listener} routes, expected one target")
    return target


def _target(*children: str, kind: str = "smtp", top: str = "") -> Target:
    """
    The target of C{target.KIND t { children }} on lines 3 on, with
    C{targets} L{DOWN} first unless the children have a C{targets} line.
    """
    if not any(line.startswith("targets") for line in children):
        children = (f"targets {DOWN}",) + children
    text = (
        "hostname relay.test\n"
        + top
        + f"target.{kind} t {{\n"
        + "\n".join(children)
        + "\n}\nsmtp tcp://127.0.0.1:2525 {\ndeliver_to &t\n}\n"
    )
    [target] = _load(text).targets
    return target


class ExampleTests(SynchronousTestCase):
    """
    The complete example of docs/configuration.md.
    """

    def test_example(self) -> None:
        config = loadString(EXAMPLE, "relay.conf", {"SMARTHOST_PASSWORD": "s3cret"})
        tls = ServerTLS(cert="/etc/smtprelay/fullchain.pem", key="/etc/smtprelay/privkey.pem")
        smarthost = Target(
            name="smarthost",
            protocol="smtp",
            endpoints=(
                Address("tcp", host="mx1.example.net", port=587),
                Address("tcp", host="mx2.example.net", port=587),
            ),
            hostname="relay.example.org",
            auth=DownstreamAuth(
                mechanism="plain", username="relay-user", password=Secret("s3cret")
            ),
            requireTLS=True,
            tlsClient=ClientTLS(rootCAs=("/etc/smtprelay/corp-ca.pem",)),
            connectTimeout=30.0,
        )
        submissionTarget = Target(
            name="submission-listener-2",
            protocol="smtp",
            endpoints=(Address("tls", host="smtp.example.net", port=465),),
            hostname="relay.example.org",
            auth=DownstreamAuth(mechanism="forward"),
        )
        lmtpTarget = Target(
            name="lmtp-listener-3",
            protocol="lmtp",
            endpoints=(Address("unix", path="/run/dovecot/lmtp"),),
            hostname="relay.example.org",
            attemptStartTLS=False,
        )
        expected = Config(
            hostname="relay.example.org",
            tls=tls,
            listeners=(
                Listener(
                    kind="smtp",
                    addresses=(Address("tcp", host="0.0.0.0", port=25),),
                    deliverTo=smarthost,
                    allow=LOOPBACK + (ipaddress.ip_network("10.0.0.0/8"),),
                    maxMessageSize=32 * 1024 * 1024,
                    tls=tls,
                ),
                Listener(
                    kind="submission",
                    addresses=(Address("tcp", host="0.0.0.0", port=587),),
                    deliverTo=submissionTarget,
                    auth=ListenerAuth(mode="forward"),
                    tls=tls,
                ),
                Listener(
                    kind="lmtp",
                    addresses=(Address("unix", path="/run/smtprelay/lmtp.sock"),),
                    deliverTo=lmtpTarget,
                    tls=tls,
                ),
            ),
            targets=(smarthost,),
            metrics=Address("tcp", host="127.0.0.1", port=9749),
            source="relay.conf",
        )
        self.assertEqual(config, expected)

    def test_contrib(self) -> None:
        """
        The annotated example in C{contrib/} is valid.
        """
        path = os.path.join(os.path.dirname(__file__), "..", "contrib", "relay.conf")
        os.environ["SMARTHOST_PASSWORD"] = "x"
        self.addCleanup(os.environ.pop, "SMARTHOST_PASSWORD")
        config = load(path)
        self.assertEqual(config.source, path)
        self.assertEqual([len(listener.targets) for listener in config.listeners], [1, 1, 2, 1])
        mx = config.listeners[2].deliverTo
        assert isinstance(mx, Routing) and isinstance(mx.default, Destinations)
        self.assertEqual(mx.default.default, Reject(550, "5.7.1", "Relay access denied"))


class TopLevelTests(SynchronousTestCase):
    """
    Top-level directives.
    """

    def test_defaults(self) -> None:
        config = _load(_listen())
        self.assertEqual(
            (config.debug, config.tls, config.tlsClient, config.metrics, config.shutdownTimeout,
             config.probeInterval),
            (False, None, ClientTLS(), None, 30.0, 30.0),
        )
        self.assertEqual(config.source, "relay.conf")

    def test_hostnameDefault(self) -> None:
        self.patch(parser, "defaultHostname", lambda: "host.example.com")
        config = _load("smtp tcp://127.0.0.1:25 {\ndeliver_to smtp tcp://127.0.0.1:26\n}\n")
        self.assertEqual(config.hostname, "host.example.com")
        self.assertEqual(_deliveredTo(config.listeners[0]).hostname, "host.example.com")

    def test_hostnameNeverLocalhost(self) -> None:
        """
        The default name is the host's FQDN as C{hostname -f} gives it: the
        canonical name of the host name, else C{getfqdn()}, else the host
        name, never C{localhost} (what C{getfqdn} says when the host name
        is an alias of 127.0.0.1 in /etc/hosts).
        """
        for hostname, canonical, fqdn, expected in [
            ("mx", "mx.example.org", "localhost", "mx.example.org"),
            ("mx", "mx", "mx.example.org", "mx.example.org"),
            ("vm", "vm", "localhost", "vm"),
            ("vm", None, "localhost", "vm"),
            ("vm", "localhost.localdomain", "localhost", "vm"),
            ("b\u00fccher", "b\u00fccher.example", "localhost", "xn--bcher-kva.example"),
            ("localhost", "localhost", "localhost", "localhost"),
        ]:
            resolver = _Resolver(hostname, canonical, fqdn)
            self.assertEqual(parser.defaultHostname(resolver), expected, hostname)

    def test_hostnameIDNA(self) -> None:
        config = _load(_listen().replace("relay.test", "bücher.example"))
        self.assertEqual(config.hostname, "xn--bcher-kva.example")

    def test_values(self) -> None:
        cases: list[tuple[str, str, Any]] = [
            ("debug", "debug", True),
            ("debug yes", "debug", True),
            ("debug OFF", "debug", False),
            ("shutdown_timeout 1m", "shutdownTimeout", 60.0),
            ("shutdown_timeout 0", "shutdownTimeout", 0.0),
            ("probe_interval 10s", "probeInterval", 10.0),
            ("probe_interval 1m30s", "probeInterval", 90.0),
            (
                "metrics tcp://127.0.0.1:9749",
                "metrics",
                Address("tcp", host="127.0.0.1", port=9749),
            ),
            ("tls c.pem k.pem", "tls", ServerTLS(cert="c.pem", key="k.pem")),
            ("tls off", "tls", None),
            (
                "tls c.pem k.pem {\nprotocols tls1.3\nciphers A B\nclient_ca ca.pem\n}",
                "tls",
                ServerTLS("c.pem", "k.pem", ("tls1.3", None), "A:B", "ca.pem"),
            ),
            (
                (
                    "tls_client {\nroot_ca a.pem b.pem\ncert c.pem\nkey k.pem\nprotocols tls1.2 tls1.3\n"
                    "ciphers X\ncurves X25519 P-256\nserver_name mx.test\ninsecure_skip_verify\n}"
                ),
                "tlsClient",
                ClientTLS(
                    rootCAs=("a.pem", "b.pem"),
                    cert="c.pem",
                    key="k.pem",
                    protocols=("tls1.2", "tls1.3"),
                    ciphers="X",
                    curves=("X25519", "P-256"),
                    serverName="mx.test",
                    insecureSkipVerify=True,
                ),
            ),
        ]
        for line, field, value in cases:
            with self.subTest(line):
                config = _load(_listen(top=line + "\n"))
                self.assertEqual(getattr(config, field), value)

    def test_errors(self) -> None:
        # The listener takes lines 1-4; the directive under test is on line 5.
        cases = [
            ("debug maybe", 'debug: "maybe" is not a boolean (use yes or no)'),
            ("debug yes no", "debug: expected yes or no"),
            ("debug {\n}", "debug: takes no block (expected yes or no)"),
            ("hostname", "hostname: expected NAME"),
            ("hostname a b", "hostname: expected NAME"),
            ("shutdown_timeout 30", 'shutdown_timeout: "30" is not a duration'),
            ("shutdown_timeout", "shutdown_timeout: expected a duration such as 30s or 5m"),
            ("probe_interval 0", "probe_interval: must be longer than 0"),
            ("probe_interval 10", 'probe_interval: "10" is not a duration'),
            ("metrics unix:///run/m.sock", "metrics: must be a tcp://HOST:PORT address"),
            ("metrics tcp://x", 'metrics: "tcp://x": missing port'),
            ("tls c.pem", "tls: expected CERT KEY [{ ... }] or off"),
            ("tls a b c", "tls: expected CERT KEY [{ ... }] or off"),
            ("tls c k {\nprotocols ssl3\n}", 'protocols: unknown version "ssl3"'),
            ("tls c k {\nbogus\n}", 'unknown directive "bogus"'),
            ("tls_client x {\n}", "tls_client: takes no arguments, only a { ... } block"),
            ("tls_client {\ncert c.pem\n}", "tls_client: cert and key go together"),
            ("tls_client {\nkey k.pem\n}", "tls_client: cert and key go together"),
            ("tls_client {\ninsecure_skip_verify maybe\n}", "insecure_skip_verify: "),
            ("tls_client {\nroot_ca\n}", "root_ca: expected one or more values"),
            ("tls_client {\nprotocols tls1.3 tls1.0\n}", "protocols: tls1.3 is newer than tls1.0"),
            ("alow 10.0.0.0/8", 'unknown directive "alow"'),
            ("target.remote x {\n}", 'unknown directive "target.remote"'),
        ]
        for line, message in cases:
            with self.subTest(line):
                text = _listen(top=line + "\n")
                if line.startswith("hostname"):
                    text = line + "\n" + _listen().split("\n", 1)[1]
                errors = _errors(text)
                self.assertEqual(len(errors), 1, errors)
                error = errors[0]
                self.assertTrue(error.startswith("relay.conf:"), error)
                self.assertIn(": " + message, error)

    def test_errorLine(self) -> None:
        self.assertEqual(
            _errors(_listen(top="\n\ndebug maybe\n")),
            ['relay.conf:7: debug: "maybe" is not a boolean (use yes or no)'],
        )

    def test_duplicate(self) -> None:
        self.assertEqual(
            _errors(_listen(top="hostname b\n")),
            ["relay.conf:5: hostname: duplicate directive (first at relay.conf:1)"],
        )

    def test_didYouMean(self) -> None:
        self.assertEqual(
            _errors(_listen(top="shutdown_timout 5s\n")),
            [
                'relay.conf:5: unknown directive "shutdown_timout" (did you mean "shutdown_timeout"?)'
            ],
        )

    def test_noListeners(self) -> None:
        self.assertEqual(
            _errors("hostname x\n"),
            ["relay.conf:1: no listeners (add an smtp, submission or lmtp block)"],
        )


class _Resolver:
    """
    The three calls of C{socket} that L{parser.defaultHostname} makes.
    """

    def __init__(self, hostname: str, canonical: str | None, fqdn: str) -> None:
        self._hostname, self._canonical, self._fqdn = hostname, canonical, fqdn

    def gethostname(self) -> str:
        return self._hostname

    def getfqdn(self, name: str) -> str:
        return self._fqdn

    def getaddrinfo(self, host: str, port: Any, flags: int = 0) -> list[tuple[Any, ...]]:
        if self._canonical is None:
            raise OSError("no address")
        return [(2, 1, 6, self._canonical if flags & socket.AI_CANONNAME else "", ("127.0.0.1", 0))]


class ListenerTests(SynchronousTestCase):
    """
    Listener directives.
    """

    def test_defaults(self) -> None:
        listener = _listener()
        self.assertEqual(
            listener,
            Listener(
                kind="smtp",
                addresses=(Address("tcp", host="127.0.0.1", port=2525),),
                deliverTo=listener.deliverTo,
            ),
        )
        self.assertEqual(listener.allow, LOOPBACK)
        self.assertEqual(listener.limitExceptions, LOOPBACK)
        self.assertEqual(
            (listener.rateLimitWindow, listener.maxConnectionRate, listener.maxMessageRate,
             listener.maxRecipientRate),
            (60.0, 0, 0, 0),
        )

    def test_kinds(self) -> None:
        for kind in ("smtp", "lmtp"):
            with self.subTest(kind):
                listener = _listener(head=f"{kind} tcp://127.0.0.1:2525")
                self.assertEqual(listener.kind, kind)
        submission = _listener("auth users /etc/users", head="submission tcp://[::1]:587")
        self.assertEqual(submission.kind, "submission")
        self.assertEqual(submission.addresses, (Address("tcp", host="::1", port=587),))

    def test_severalAddresses(self) -> None:
        listener = _listener(head="smtp tcp://127.0.0.1:25 unix:/run/s.sock tcp:[::1]:25")
        self.assertEqual(
            listener.addresses,
            (
                Address("tcp", host="127.0.0.1", port=25),
                Address("unix", path="/run/s.sock"),
                Address("tcp", host="::1", port=25),
            ),
        )

    VALUES: ClassVar[list[tuple[str, str, Any]]] = [
        (
            "allow 10.0.0.0/8 192.0.2.1 ::1",
            "allow",
            tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.0.2.1/32", "::1/128")),
        ),
        ("auth off", "auth", ListenerAuth()),
        ("auth forward", "auth", ListenerAuth(mode="forward")),
        (
            "auth users /etc/smtprelay/users",
            "auth",
            ListenerAuth(mode="users", usersFile="/etc/smtprelay/users"),
        ),
        ("require_tls", "requireTLS", True),
        ("max_message_size 10M", "maxMessageSize", 10 * 1024 * 1024),
        ("max_message_size 1000", "maxMessageSize", 1000),
        ("max_recipients 100", "maxRecipients", 100),
        ("max_line_length 2000", "maxLineLength", 2000),
        ("max_command_length 4096", "maxCommandLength", 4096),
        ("max_connections 10", "maxConnections", 10),
        ("max_connections_per_ip 2", "maxConnectionsPerIP", 2),
        ("limit_exceptions 192.0.2.0/24", "limitExceptions",
         (ipaddress.ip_network("192.0.2.0/24"),)),
        ("limit_exceptions none", "limitExceptions", ()),
        ("allow 10.0.0.0/8", "limitExceptions", (ipaddress.ip_network("10.0.0.0/8"),)),
        ("max_errors 5", "maxErrors", 5),
        ("max_auth_failures 1", "maxAuthFailures", 1),
        ("read_timeout 1m", "readTimeout", 60.0),
        ("data_timeout 1h 30m", "dataTimeout", 5400.0),
        ("proxy_timeout 2s", "proxyTimeout", 2.0),
        ("max_hops 10", "maxHops", 10),
        (
            "proxy_protocol 10.1.0.0/16 10.2.0.5",
            "proxyProtocol",
            (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.5/32")),
        ),
        ("bare_lf normalize", "bareLF", "normalize"),
        ("bare_lf reject", "bareLF", "reject"),
        ('endpoint "systemd:domain=INET:index=0"', "endpoints", ("systemd:domain=INET:index=0",)),
        (
            "endpoint systemd:domain=INET:index=0\nendpoint tcp:2525",
            "endpoints",
            ("systemd:domain=INET:index=0", "tcp:2525"),
        ),
        ("reuse_port yes", "reusePort", True),
        ("tls c.pem k.pem", "tls", ServerTLS("c.pem", "k.pem")),
        ("rate_limit_window 10m", "rateLimitWindow", 600.0),
        ("max_connection_rate 30", "maxConnectionRate", 30),
        ("max_message_rate 100", "maxMessageRate", 100),
        ("max_recipient_rate 0", "maxRecipientRate", 0),
    ]

    def test_values(self) -> None:
        for line, field, value in self.VALUES:
            with self.subTest(line):
                listener = _listener(*line.split("\n"), top="tls c.pem k.pem\n")
                self.assertEqual(getattr(listener, field), value)

    ERRORS: ClassVar[list[Any]] = [
        ("allow", "allow: expected one or more networks (CIDR)"),
        ("allow 10.0.0.1/8", 'allow: "10.0.0.1/8" is not a network'),
        ("allow everyone", 'allow: "everyone" is not a network'),
        ("auth", "auth: expected off, forward or users FILE"),
        ("auth on", "auth: expected off, forward or users FILE"),
        ("auth users", "auth: expected off, forward or users FILE"),
        ("auth forward x", "auth: expected off, forward or users FILE"),
        ("require_tls perhaps", 'require_tls: "perhaps" is not a boolean'),
        ("max_message_size big", 'max_message_size: "big" is not a size'),
        ("max_message_size 0", "max_message_size: must be greater than 0"),
        ("max_recipients 99", "max_recipients: must be at least 100 (RFC 5321)"),
        ("max_recipients 1e3", 'max_recipients: "1e3" is not a number'),
        ("max_recipients -100", 'max_recipients: "-100" is not a number'),
        ("max_recipients", "max_recipients: expected a number"),
        ("max_recipients 100 200", "max_recipients: expected a number"),
        ("max_line_length 999", "max_line_length: must be at least 1000 (RFC 5321)"),
        ("max_command_length 511", "max_command_length: must be at least 512 (RFC 5321)"),
        ("max_connections 0", "max_connections: must be at least 1"),
        ("max_connections_per_ip 0", "max_connections_per_ip: must be at least 1"),
        ("max_errors 0", "max_errors: must be at least 1"),
        ("max_auth_failures 0", "max_auth_failures: must be at least 1"),
        ("max_hops 0", "max_hops: must be at least 1"),
        ("read_timeout 0", "read_timeout: must be longer than 0"),
        ("read_timeout 5", 'read_timeout: "5" is not a duration'),
        ("data_timeout 1d", 'data_timeout: "1d" is not a duration'),
        ("proxy_timeout", "proxy_timeout: expected a duration"),
        ("proxy_protocol", "proxy_protocol: expected one or more networks"),
        ("bare_lf accept", 'bare_lf: expected reject or normalize, not "accept"'),
        ("endpoint", "endpoint: expected a Twisted endpoint string"),
        ('endpoint ""', 'endpoint: "" is not an endpoint string'),
        ("reuse_port 2", 'reuse_port: "2" is not a boolean'),
        ("tls c.pem", "tls: expected CERT KEY [{ ... }] or off"),
        ("tls off {\n}", "tls: expected CERT KEY [{ ... }] or off"),
        ("alow 10.0.0.0/8", 'unknown directive "alow" (did you mean "allow"?)'),
        ("source example.org {\nmax_hops 1\n}", "max_hops: not allowed here (expected deliver_to or reject)"),
        ("allow 10.0.0.0/8\nallow ::1", "allow: duplicate directive (first at relay.conf:3)"),
    ]

    def test_errors(self) -> None:
        for line, message in self.ERRORS:
            with self.subTest(line):
                errors = _errors(_listen(*line.split("\n")))
                self.assertEqual(len(errors), 1, errors)
                self.assertTrue(errors[0].startswith("relay.conf:"), errors)
                self.assertIn(": " + message, errors[0])

    def test_errorLine(self) -> None:
        self.assertEqual(
            _errors(_listen("allow 10.0.0.0/8", "max_recipients 50")),
            ["relay.conf:4: max_recipients: must be at least 100 (RFC 5321)"],
        )

    def test_addressErrors(self) -> None:
        self.assertEqual(
            _errors(_listen(head="smtp tcp://127.0.0.1:0 http://x:80")),
            [
                'relay.conf:2: smtp: "tcp://127.0.0.1:0": port 0 is out of range (1-65535)',
                (
                    'relay.conf:2: smtp: "http://x:80": unsupported scheme "http" '
                    "(use tcp://, tls:// or unix://)"
                ),
            ],
        )

    def test_noAddress(self) -> None:
        self.assertEqual(
            _errors(_listen(head="smtp")),
            ["relay.conf:2: smtp: expected ADDRESS... { ... } (or an endpoint directive)"],
        )

    def test_endpointOnly(self) -> None:
        listener = _listener('endpoint "systemd:domain=INET:index=0"', head="smtp")
        self.assertEqual(listener.addresses, ())
        self.assertEqual(listener.endpoints, ("systemd:domain=INET:index=0",))

    def test_noDeliverTo(self) -> None:
        self.assertEqual(
            _errors("hostname x\nsmtp tcp://127.0.0.1:25 {\n}\nlmtp unix:/x\n"),
            [
                "relay.conf:2: smtp: listener needs deliver_to",
                "relay.conf:4: lmtp: listener needs deliver_to",
            ],
        )

    def test_submissionNeedsAuth(self) -> None:
        head = "submission tcp://127.0.0.1:587"
        self.assertEqual(
            _errors(_listen(head=head)),
            ["relay.conf:2: submission listener needs auth forward or auth users FILE"],
        )
        self.assertEqual(
            _errors(_listen("auth off", head=head)),
            ["relay.conf:3: submission listener needs auth forward or auth users FILE"],
        )
        self.assertEqual(_listener("auth forward", head=head).auth, ListenerAuth(mode="forward"))

    def test_tlsInherited(self) -> None:
        """
        A listener's TLS is the global one unless it has its own or
        C{tls off}.
        """
        top = "tls /g/cert.pem /g/key.pem\n"
        self.assertEqual(_listener(top=top).tls, ServerTLS("/g/cert.pem", "/g/key.pem"))
        self.assertEqual(_listener("tls /l/c /l/k", top=top).tls, ServerTLS("/l/c", "/l/k"))
        self.assertIsNone(_listener("tls off", top=top).tls)
        self.assertIsNone(_listener().tls)

    def test_tlsListenerNeedsCertificate(self) -> None:
        self.assertEqual(
            _errors(_listen(head="smtp tls://0.0.0.0:465")),
            ["relay.conf:2: smtp: tls://0.0.0.0:465 needs a certificate (tls CERT KEY)"],
        )
        self.assertEqual(
            _errors(_listen("require_tls yes")),
            ["relay.conf:3: require_tls: needs a certificate (tls CERT KEY)"],
        )
        self.assertEqual(
            _listener(head="smtp tls://0.0.0.0:465", top="tls c k\n").addresses,
            (Address("tls", host="0.0.0.0", port=465),),
        )


class DeliverToTests(SynchronousTestCase):
    """
    C{deliver_to} and the targets it names or defines.
    """

    def test_inline(self) -> None:
        target = _listener("deliver_to smtp tcp://a.test:25 tls://b.test:465").deliverTo
        self.assertEqual(
            target,
            Target(
                name="smtp-listener-1",
                protocol="smtp",
                endpoints=(
                    Address("tcp", host="a.test", port=25),
                    Address("tls", host="b.test", port=465),
                ),
                hostname="relay.test",
            ),
        )

    def test_inlineLMTP(self) -> None:
        target = _deliveredTo(_listener("deliver_to lmtp unix:///run/dovecot/lmtp"))
        self.assertEqual((target.protocol, target.attemptStartTLS), ("lmtp", False))

    def test_inlineBlock(self) -> None:
        """
        C{targets} in the block come before the addresses on the line.
        """
        target = _deliveredTo(_listener(
            "deliver_to smtp tcp://inline.test:25 {",
            "targets tcp://first.test:25",
            "connect_timeout 10s",
            "}",
        ))
        self.assertEqual([a.host for a in target.endpoints], ["first.test", "inline.test"])
        self.assertEqual(target.connectTimeout, 10.0)

    def test_inlineBlockOnly(self) -> None:
        target = _deliveredTo(_listener("deliver_to lmtp {", "targets unix:/x", "}"))
        self.assertEqual(target.endpoints, (Address("unix", path="/x"),))

    def test_named(self) -> None:
        """
        Named targets may be defined after use and shared by listeners.
        """
        config = _load(
            "hostname h\n"
            "smtp tcp://127.0.0.1:25 {\ndeliver_to &one\n}\n"
            "lmtp unix:/l {\ndeliver_to &two\n}\n"
            "submission tcp://127.0.0.1:587 {\nauth users /u\ndeliver_to &one\n}\n"
            "target.smtp one {\ntargets tcp://one.test:25\n}\n"
            "target.lmtp two {\ntargets unix:/two\n}\n"
        )
        one, two = config.targets
        self.assertEqual(
            (one.name, one.protocol, two.name, two.protocol), ("one", "smtp", "two", "lmtp")
        )
        self.assertEqual([l.deliverTo for l in config.listeners], [one, two, one])
        self.assertFalse(two.attemptStartTLS)

    def test_errors(self) -> None:
        cases = [
            ("deliver_to", "deliver_to: expected &NAME or smtp|lmtp ADDRESS... [{ ... }]"),
            ("deliver_to &nope", 'deliver_to: unknown target "&nope"'),
            ("deliver_to &", "deliver_to: expected &NAME alone"),
            ("deliver_to &a &b", "deliver_to: expected &NAME alone"),
            ("deliver_to &a {\n}", "deliver_to: expected &NAME alone"),
            (
                "deliver_to remote",
                'deliver_to: expected &NAME or smtp|lmtp ADDRESS... [{ ... }], not "remote"',
            ),
            ("deliver_to smtp", "deliver_to: no endpoints (add targets ADDRESS...)"),
            ("deliver_to smtp tcp://x", 'deliver_to: "tcp://x": missing port (as in tcp://x:25)'),
            (
                "deliver_to smtp tcp://x:25 {\nlmtp_split tempfail\n}",
                "lmtp_split: only LMTP targets split recipients",
            ),
        ]
        for line, message in cases:
            with self.subTest(line):
                self.assertEqual(
                    [e.split(": ", 1)[1] for e in _errors(_listen(*line.split("\n")))], [message]
                )

    def test_unknownTargetLine(self) -> None:
        self.assertEqual(
            _errors(_listen("allow ::1", "deliver_to &foo")),
            ['relay.conf:4: deliver_to: unknown target "&foo"'],
        )

    def test_namedTargetErrors(self) -> None:
        """
        A broken named target is reported once, not again by its users.
        """
        text = (
            "hostname h\nsmtp tcp://127.0.0.1:25 {\ndeliver_to &t\n}\n"
            "target.smtp t {\n}\n"
            "target.smtp t {\ntargets tcp://x:25\n}\n"
            "target.smtp {\n}\n"
        )
        self.assertEqual(
            _errors(text),
            [
                "relay.conf:5: target.smtp: no endpoints (add targets ADDRESS...)",
                'relay.conf:7: target.smtp: a target named "t" already exists',
                "relay.conf:10: target.smtp: expected NAME { ... }",
            ],
        )

    def test_authForward(self) -> None:
        """
        C{auth forward} on a listener sets it on its target; the named
        target itself is unchanged.
        """
        config = _load(
            "hostname h\n"
            "submission tcp://127.0.0.1:587 {\nauth forward\ndeliver_to &t\n}\n"
            "target.smtp t {\ntargets tcp://x:25\n}\n"
        )
        self.assertEqual(_deliveredTo(config.listeners[0]).auth, DownstreamAuth(mechanism="forward"))
        self.assertEqual(config.targets[0].auth, DownstreamAuth())
        self.assertEqual(
            _deliveredTo(_listener(
                "auth forward", "deliver_to smtp tcp://x:25 {\nauth forward\n}"
            )).auth,
            DownstreamAuth(mechanism="forward"),
        )

    def test_authForwardConflict(self) -> None:
        self.assertEqual(
            _errors(_listen("auth forward", "deliver_to smtp tcp://x:25 {", "auth plain u p", "}")),
            ['relay.conf:3: auth forward: target "smtp-listener-1" already uses auth plain'],
        )


class TargetTests(SynchronousTestCase):
    """
    Target directives.
    """

    def test_defaults(self) -> None:
        self.assertEqual(
            _target(),
            Target(name="t", protocol="smtp", endpoints=(DOWN,), hostname="relay.test"),
        )
        self.assertEqual(
            _target(kind="lmtp"),
            Target(
                name="t",
                protocol="lmtp",
                endpoints=(DOWN,),
                hostname="relay.test",
                attemptStartTLS=False,
            ),
        )

    def test_globalDefaults(self) -> None:
        """
        C{debug} and C{tls_client} default to the global settings.
        """
        target = _target(top="debug\ntls_client {\nroot_ca /ca.pem\n}\n")
        self.assertEqual(target.debug, True)
        self.assertEqual(target.tlsClient, ClientTLS(rootCAs=("/ca.pem",)))
        own = _target(
            "debug no",
            "tls_client {",
            "server_name x.test",
            "}",
            top="debug\ntls_client {\nroot_ca /ca.pem\n}\n",
        )
        self.assertEqual(own.debug, False)
        self.assertEqual(own.tlsClient, ClientTLS(serverName="x.test"))

    VALUES: ClassVar[list[tuple[str, str, Any]]] = [
        (
            "targets tcp://b.test:25 unix:/c",
            "endpoints",
            (Address("tcp", host="b.test", port=25), Address("unix", path="/c")),
        ),
        ("debug", "debug", True),
        ("attempt_starttls no", "attemptStartTLS", False),
        ("require_tls", "requireTLS", True),
        ("auth off", "auth", DownstreamAuth()),
        ("auth forward", "auth", DownstreamAuth(mechanism="forward")),
        ("auth plain user pass", "auth", DownstreamAuth("plain", "user", Secret("pass"))),
        ("auth login user pass", "auth", DownstreamAuth("login", "user", Secret("pass"))),
        ('auth plain user "pa ss"', "auth", DownstreamAuth("plain", "user", Secret("pa ss"))),
        ("hostname mx.test", "hostname", "mx.test"),
        ("hostname Bücher.example", "hostname", "xn--bcher-kva.example"),
        ("connect_timeout 30s", "connectTimeout", 30.0),
        ("command_timeout 1m", "commandTimeout", 60.0),
        ("submission_timeout 1h", "submissionTimeout", 3600.0),
        ("data_timeout 250ms", "dataTimeout", 0.25),
        ("backoff 0", "backoff", 0.0),
        ("backoff 1m", "backoff", 60.0),
        ("reuse_connections no", "reuseConnections", False),
        ("reuse_idle_time 10s", "reuseIdleTime", 10.0),
        ("reuse_time_limit 1h", "reuseTimeLimit", 3600.0),
    ]

    def test_values(self) -> None:
        for line, field, value in self.VALUES:
            with self.subTest(line):
                self.assertEqual(getattr(_target(line), field), value)

    def test_reuseDefaults(self) -> None:
        """
        Like Postfix's connection cache: on, 2 s idle, 300 s per connection.
        """
        target = _target()
        self.assertEqual(
            (target.reuseConnections, target.reuseIdleTime, target.reuseTimeLimit), (True, 2.0, 300.0)
        )

    def test_lmtpSplit(self) -> None:
        self.assertEqual(_target(kind="lmtp").lmtpSplit, "one_rcpt")
        self.assertEqual(_target("lmtp_split tempfail", kind="lmtp").lmtpSplit, "tempfail")

    def test_authExternal(self) -> None:
        block = ["tls_client {", "cert c.pem", "key k.pem", "}"]
        self.assertEqual(
            _target("auth external", *block).auth, DownstreamAuth(mechanism="external")
        )
        self.assertEqual(
            _target("auth external", top="tls_client {\ncert c\nkey k\n}\n").auth.mechanism,
            "external",
        )

    ERRORS: ClassVar[list[Any]] = [
        ("targets", "targets: expected one or more ADDRESSes"),
        ("targets ftp://x:21", 'targets: "ftp://x:21": unsupported scheme "ftp"'),
        ("debug 3", 'debug: "3" is not a boolean'),
        ("attempt_starttls sometimes", 'attempt_starttls: "sometimes" is not a boolean'),
        (
            "auth",
            "auth: expected off, plain USER PASSWORD, login USER PASSWORD, forward or external",
        ),
        ("auth plain user", "auth: expected off, plain USER PASSWORD"),
        ("auth cram-md5 u p", "auth: expected off, plain USER PASSWORD"),
        ('auth plain "" p', "auth: plain: empty user name"),
        (
            "auth external",
            "auth: external needs a client certificate (tls_client { cert ... key ... })",
        ),
        ("hostname", "hostname: expected NAME"),
        ("hostname a..b", 'hostname: "a..b" is not a valid host name'),
        ("connect_timeout 0", "connect_timeout: must be longer than 0"),
        ("command_timeout 5", 'command_timeout: "5" is not a duration'),
        ("submission_timeout -1m", 'submission_timeout: "-1m" is not a duration'),
        ("data_timeout", "data_timeout: expected a duration"),
        ("backoff 1d", 'backoff: "1d" is not a duration'),
        ("reuse_connections maybe", 'reuse_connections: "maybe" is not a boolean'),
        ("reuse_idle_time 0", "reuse_idle_time: must be longer than 0"),
        ("lmtp_split tempfail", "lmtp_split: only LMTP targets split recipients"),
        ("tls_client {\ncert c\n}", "tls_client: cert and key go together"),
        ("require_tls {\n}", "require_tls: takes no block"),
        ("debug no\ndebug no", "debug: duplicate directive (first at relay.conf:4)"),
        ("timeout 5m", 'unknown directive "timeout"'),
    ]

    def test_errors(self) -> None:
        for line, message in self.ERRORS:
            with self.subTest(line):
                with self.assertRaises(ConfigError) as e:
                    _target(*line.split("\n"))
                self.assertEqual(len(e.exception.errors), 1, e.exception.errors)
                self.assertIn(": " + message, e.exception.errors[0])

    def test_lmtpSplitBadValue(self) -> None:
        with self.assertRaises(ConfigError) as e:
            _target("lmtp_split all", kind="lmtp")
        self.assertEqual(
            e.exception.errors,
            ['relay.conf:4: lmtp_split: expected one_rcpt or tempfail, not "all"'],
        )

    def test_chunking(self) -> None:
        """
        C{chunking}: BDAT to downstreams that offer it, unless off.
        """
        self.assertTrue(_target().chunking)
        self.assertFalse(_target("chunking no").chunking)

    def test_forwardClientInfo(self) -> None:
        """
        C{forward_client_info}: off by default; xforward or xclient.
        """
        self.assertEqual(_target().forwardClientInfo, "off")
        self.assertEqual(_target("forward_client_info xforward").forwardClientInfo, "xforward")
        self.assertEqual(_target("forward_client_info xclient", kind="lmtp").forwardClientInfo, "xclient")
        with self.assertRaises(ConfigError) as e:
            _target("forward_client_info yes")
        self.assertEqual(
            e.exception.errors,
            ['relay.conf:4: forward_client_info: expected off or xforward or xclient, not "yes"'],
        )


class SecretTests(SynchronousTestCase):
    """
    Passwords: from the file, the environment or a file; never shown.
    """

    def auth(self, line: str, env: Mapping[str, str] | None = None) -> DownstreamAuth:
        text = _listen("deliver_to smtp tcp://x:25 {", line, "}")
        return _deliveredTo(_load(text, env).listeners[0]).auth

    def test_env(self) -> None:
        auth = self.auth("auth plain u {env:PW}", {"PW": "from env"})
        self.assertEqual(auth.password, Secret("from env"))

    def test_envUnset(self) -> None:
        self.assertEqual(
            _errors(_listen("deliver_to smtp tcp://x:25 {", "auth plain u {env:PW}", "}")),
            ["relay.conf:4: auth: empty password (is its environment variable set?)"],
        )

    def test_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("first line\r\nsecond\n")
        self.assertEqual(self.auth(f"auth login u file:{path}").password, Secret("first line"))
        self.assertEqual(
            self.auth("auth login u file:{env:F}", {"F": path}).password, Secret("first line")
        )

    def test_fileErrors(self) -> None:
        missing = self.mktemp()
        empty = self.mktemp()
        open(empty, "w").close()
        self.assertEqual(
            _errors(_listen("deliver_to smtp tcp://x:25 {", f"auth plain u file:{missing}", "}")),
            [f"relay.conf:4: auth: {missing}: cannot read: No such file or directory"],
        )
        self.assertEqual(
            _errors(_listen("deliver_to smtp tcp://x:25 {", f"auth plain u file:{empty}", "}")),
            [f"relay.conf:4: auth: {empty}: empty password file"],
        )

    def test_masked(self) -> None:
        """
        The password is in no repr and no error message.
        """
        text = _listen("deliver_to smtp tcp://x:25 {", "auth plain u hunter2", "}")
        config = _load(text)
        self.assertEqual(_deliveredTo(config.listeners[0]).auth.password, Secret("hunter2"))
        self.assertNotIn("hunter2", repr(config))
        self.assertNotIn("hunter2", str(config))
        for bad in ("auth plain u hunter2 extra", "auth cram u hunter2", 'auth plain "" hunter2'):
            with self.subTest(bad):
                errors = _errors(_listen("deliver_to smtp tcp://x:25 {", bad, "}"))
                self.assertEqual(len(errors), 1)
                self.assertNotIn("hunter2", errors[0])


class EnvironmentListTests(SynchronousTestCase):
    """
    A list in one environment variable, as containers configure: an
    argument from C{{env:...}} holds items separated by spaces or commas.
    """

    ENV = {
        "LISTEN": "tcp://127.0.0.1:25,tcp://[::1]:25",
        "ALLOW": "10.0.0.0/8, 192.168.0.0/16",
        "TARGETS": " tcp://a.test:25  tcp://b.test:25 ",
        "EMPTY": "",
    }

    def test_lists(self) -> None:
        text = _listen("allow {env:ALLOW} ::1", "deliver_to smtp {env:TARGETS} tcp://c.test:25",
                       head="smtp {env:LISTEN}")
        [listener] = _load(text, self.ENV).listeners
        self.assertEqual(listener.addresses, (Address("tcp", host="127.0.0.1", port=25),
                                              Address("tcp", host="::1", port=25)))
        self.assertEqual(listener.allow, tuple(ipaddress.ip_network(n) for n in
                                               ("10.0.0.0/8", "192.168.0.0/16", "::1/128")))
        self.assertEqual(_deliveredTo(listener).endpoints,
                         tuple(Address("tcp", host=h, port=25) for h in ("a.test", "b.test", "c.test")))

    def test_targetsDirective(self) -> None:
        text = ("hostname relay.test\ntarget.smtp t {\ntargets {env:TARGETS}\n}\n"
                "smtp tcp://127.0.0.1:2525 {\ndeliver_to &t\n}\n")
        [target] = _load(text, self.ENV).targets
        self.assertEqual(target.endpoints, tuple(Address("tcp", host=h, port=25) for h in ("a.test", "b.test")))

    def test_literalsAreNotSplit(self) -> None:
        """
        Only values from the environment are split: in the file, items are
        separate words.
        """
        [error] = _errors(_listen('allow "10.0.0.0/8,192.168.0.0/16"'))
        self.assertTrue(error.startswith('relay.conf:3: allow: "10.0.0.0/8,192.168.0.0/16" is not a network'),
                        error)

    def test_empty(self) -> None:
        """
        An empty or unset variable is an empty list: an error where the
        directive needs at least one item.
        """
        self.assertEqual(
            _errors(_listen("allow {env:EMPTY}", "deliver_to smtp {env:EMPTY}", head="smtp {env:EMPTY}"),
                    self.ENV),
            ["relay.conf:2: smtp: expected ADDRESS... { ... } (or an endpoint directive)",
             "relay.conf:3: allow: expected one or more networks (CIDR)",
             "relay.conf:4: deliver_to: no endpoints (add targets ADDRESS...)"],
        )


class AllErrorsTests(SynchronousTestCase):
    """
    One run reports every error, in file order, with its file and line.
    """

    def test_allErrors(self) -> None:
        text = """\
hostname relay.test
debug maybe
smtp tcp://127.0.0.1:25 {
    alow 10.0.0.0/8
    max_recipients 5
    deliver_to &foo
}
target.smtp bar {
    targets tcp://x:25
    connect_timeout 5
}
submission tcp://127.0.0.1:587 {
    deliver_to &bar
}
"""
        self.assertEqual(
            _errors(text),
            [
                'relay.conf:2: debug: "maybe" is not a boolean (use yes or no)',
                'relay.conf:4: unknown directive "alow" (did you mean "allow"?)',
                "relay.conf:5: max_recipients: must be at least 100 (RFC 5321)",
                'relay.conf:6: deliver_to: unknown target "&foo"',
                (
                    'relay.conf:10: connect_timeout: "5" is not a duration (use a number with a unit: '
                    "h, m, s, ms, us or ns, as in 1h30m or 250ms)"
                ),
                "relay.conf:12: submission listener needs auth forward or auth users FILE",
            ],
        )

    def test_imported(self) -> None:
        """
        Errors in imported files name that file and its lines, in the order
        of the files.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        main = os.path.join(directory, "relay.conf")
        targets = os.path.join(directory, "targets.conf")
        with open(main, "w") as f:
            f.write(
                "hostname h\nimport targets\nsmtp tcp://127.0.0.1:25 {\nmax_hops 0\ndeliver_to &t\n}\n"
            )
        with open(targets, "w") as f:
            f.write("# targets\ntarget.smtp t {\n  targets tcp://x:25\n  backoff 1d\n}\n")
        with self.assertRaises(ConfigError) as e:
            load(main)
        self.assertEqual(
            e.exception.errors,
            [
                f"{main}:4: max_hops: must be at least 1",
                (
                    f'{targets}:4: backoff: "1d" is not a duration (use a number with a unit: '
                    "h, m, s, ms, us or ns, as in 1h30m or 250ms)"
                ),
            ],
        )

    def test_importedValid(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        main = os.path.join(directory, "relay.conf")
        with open(main, "w") as f:
            f.write(
                "hostname h\nsmtp tcp://127.0.0.1:25 {\nimport common\ndeliver_to &t\n}\nimport t\n"
            )
        with open(os.path.join(directory, "common.conf"), "w") as f:
            f.write("max_hops 7\n")
        with open(os.path.join(directory, "t.conf"), "w") as f:
            f.write("target.lmtp t {\ntargets unix:/x\n}\n")
        config = load(main)
        self.assertEqual(config.listeners[0].maxHops, 7)
        self.assertEqual(config.targets[0].protocol, "lmtp")

    def test_syntaxError(self) -> None:
        self.assertEqual(
            _errors("smtp tcp://x:25 {\n"),
            ["relay.conf:1: block opened here is not closed (missing })"],
        )


class ModelTests(SynchronousTestCase):
    """
    The parser's output is the frozen model.
    """

    def test_frozen(self) -> None:
        config = _load(_listen())
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "hostname", "x")


ROUTING = """\
hostname relay.test
target.smtp corp {
    targets tcp://127.0.0.1:2601
}
target.smtp smarthost {
    targets tcp://127.0.0.1:2602
}
smtp tcp://0.0.0.0:25 {
    source example.org Boss@Example.COM { deliver_to &corp }
    destination example.net Lists.Example.NET bob@Bücher.example {
        deliver_to lmtp unix:///run/dovecot/lmtp
    }
    default_destination { deliver_to &smarthost }
}
"""


def _routing(*children: str) -> list[str]:
    """
    The errors of a listener made of C{children} (line 3 on) with a
    named target C{t} (line 8).
    """
    return _errors(
        "hostname relay.test\nsmtp tcp://127.0.0.1:2525 {\n" + "\n".join(children)
        + "\n}\ntarget.smtp t {\ntargets tcp://127.0.0.1:26\n}\n"
    )


class RoutingTests(SynchronousTestCase):
    """
    Routing blocks: C{source}, C{destination} and their defaults in a listener.
    """

    def test_specExample(self) -> None:
        """
        Beyond maddy: C{source} blocks beside the listener's own
        C{destination} blocks, which route every other sender; rules are
        normalized (lower case, A-labels) and one block's rules share one
        decision.
        """
        config = _load(ROUTING)
        corp, smarthost = config.targets
        routing = config.listeners[0].deliverTo
        self.assertIsInstance(routing, Routing)
        assert isinstance(routing, Routing)
        self.assertEqual(routing.sources, (("example.org", corp), ("boss@example.com", corp)))
        destinations = routing.default
        assert isinstance(destinations, Destinations)
        keys = [key for key, _ in destinations.rules]
        self.assertEqual(keys, ["example.net", "lists.example.net", "bob@xn--bcher-kva.example"])
        [lmtp] = {id(d): d for _, d in destinations.rules}.values()
        assert isinstance(lmtp, Target)
        self.assertEqual((lmtp.name, lmtp.protocol, lmtp.endpoints),
                         ("smtp-listener-1-route-1", "lmtp", (Address("unix", path="/run/dovecot/lmtp"),)))
        self.assertIs(destinations.default, smarthost)
        self.assertEqual(config.listeners[0].targets, (corp, lmtp, smarthost))

    def test_defaultSourceAndNestedDestinations(self) -> None:
        """
        maddy's own shape: C{default_source} for other senders, and
        C{destination} blocks inside a C{source} block.
        """
        [listener] = _load(
            "target.smtp t {\ntargets tcp://127.0.0.1:26\n}\n"
            "smtp tcp://127.0.0.1:25 {\n"
            "  source lists.test {\n"
            "    destination a.test { deliver_to &t }\n"
            "    default_destination { reject }\n"
            "  }\n"
            "  default_source { deliver_to &t }\n"
            "}\n"
        ).listeners
        t = listener.targets[0]
        self.assertEqual(
            listener.deliverTo,
            Routing((("lists.test", Destinations((("a.test", t),), Reject())),), t),
        )

    def test_reject(self) -> None:
        """
        C{reject [CODE [ENHANCED [TEXT]]]} with maddy's defaults; the
        enhanced code follows a bare code's class.
        """
        cases = [
            ("reject", Reject(554, "5.7.0", "Message rejected due to a local policy")),
            ("reject 450", Reject(450, "4.7.0", "Message rejected due to a local policy")),
            ("reject 550 5.1.2", Reject(550, "5.1.2", "Message rejected due to a local policy")),
            ('reject 550 5.1.2 "unknown domain"', Reject(550, "5.1.2", "unknown domain")),
        ]
        for line, expected in cases:
            with self.subTest(line):
                [listener] = _load(f"smtp tcp://127.0.0.1:25 {{\n{line}\n}}\n").listeners
                self.assertEqual(listener.deliverTo, Routing((), expected))

    def test_errors(self) -> None:
        """
        Every mistake is reported with its line, all in one run.
        """
        self.assertEqual(
            _routing(
                "source a.test { deliver_to &t }",
                "destination b.test B.TEST { deliver_to &t }",
                "destination c.test {",
                "  deliver_to &t",
                "  reject",
                "}",
                "destination @x { reject 250 }",
                "destination d.test { reject 550 4.1.1 }",
                "destination e.test { reject 550 5.1.1 \"déjà vu\" }",
                "destination { deliver_to &t }",
                "destination f.test { deliver_to &nope }",
                "destination g.test { max_hops 3 }",
                "destination h.test { }",
                "deliver_to &t",
                "default_destination { deliver_to &t }",
                "default_destination { reject }",
            ),
            [
                "relay.conf:4: destination: B.TEST is already routed (at relay.conf:4)",
                "relay.conf:7: reject: one deliver_to or reject per block (a message goes to one target)",
                'relay.conf:9: reject: "250" is not a 4xx or 5xx reply code',
                "relay.conf:9: destination: \"@x\" has no local-part",
                "relay.conf:10: reject: 4.1.1 does not match the class of 550",
                "relay.conf:11: reject: the text must be printable ASCII",
                "relay.conf:12: destination: expected DOMAIN|ADDRESS... { ... }",
                'relay.conf:13: deliver_to: unknown target "&nope"',
                "relay.conf:14: max_hops: not allowed here (expected deliver_to or reject)",
                "relay.conf:15: destination: expected deliver_to or reject",
                "relay.conf:16: deliver_to: not beside destination blocks (put it in default_destination { ... })",
                "relay.conf:18: default_destination: duplicate directive (first at relay.conf:17)",
            ],
        )

    def test_defaultsRequired(self) -> None:
        """
        Every sender and recipient must end in a decision: no silent
        default route.
        """
        self.assertEqual(
            _routing("destination a.test { deliver_to &t }"),
            ["relay.conf:2: smtp: destination blocks need a default_destination { deliver_to ... } or { reject }"],
        )
        self.assertEqual(
            _routing("source a.test { deliver_to &t }"),
            ["relay.conf:2: smtp: source blocks need a default_source { ... } "
             "(or deliver_to or destination blocks for other senders)"],
        )
        self.assertEqual(
            _routing("source a.test {", "destination b.test { deliver_to &t }", "}", "deliver_to &t"),
            ["relay.conf:3: source: destination blocks need a default_destination { deliver_to ... } or { reject }"],
        )
        self.assertEqual(
            _routing("source a.test { deliver_to &t }", "default_source { deliver_to &t }", "reject"),
            ["relay.conf:5: reject: not beside default_source (put it in default_source { ... })"],
        )
        self.assertEqual(
            _routing("source a.test a.test { deliver_to &t }", "deliver_to &t"),
            ["relay.conf:3: source: a.test is already routed (at relay.conf:3)"],
        )

    def test_authForwardNeedsOneTarget(self) -> None:
        """
        C{auth forward} checks the password against the target at AUTH,
        before the envelope that routing needs: refused with routing.
        """
        self.assertEqual(
            _routing("auth forward", "destination a.test { deliver_to &t }",
                     "default_destination { reject }"),
            ["relay.conf:3: auth forward: needs one deliver_to target (AUTH comes before "
             "the envelope that routing blocks choose a target by)"],
        )
