"""
Tests for L{smtprelay.config.values}: booleans, numbers, durations, sizes,
addresses, networks, host names and TLS versions.
"""

from __future__ import annotations

import ipaddress
from typing import Any, ClassVar

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from smtprelay.config import parseAddress
from smtprelay.config.model import Address
from smtprelay.config.values import (
    formatDuration,
    formatSize,
    isNumber,
    parseBool,
    parseCount,
    parseDuration,
    parseNetwork,
    parseProtocols,
    parseSize,
    toALabel,
)


class BoolTests(SynchronousTestCase):
    def test_values(self) -> None:
        for text in ("yes", "YES", "true", "True", "on", "On", "1"):
            with self.subTest(text):
                self.assertIs(parseBool(text), True)
        for text in ("no", "No", "false", "FALSE", "off", "oFF", "0"):
            with self.subTest(text):
                self.assertIs(parseBool(text), False)

    def test_invalid(self) -> None:
        for text in ("", "y", "2", "enable", "yess"):
            with self.subTest(text):
                with self.assertRaises(ValueError) as e:
                    parseBool(text)
                self.assertEqual(str(e.exception), f'"{text}" is not a boolean (use yes or no)')


class CountTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for text, number in (("0", 0), ("7", 7), ("0100", 100), ("1000000", 1000000)):
            with self.subTest(text):
                self.assertTrue(isNumber(text))
                self.assertEqual(parseCount(text), number)

    def test_invalid(self) -> None:
        """
        Only ASCII digits: not the signs, underscores, spaces and other
        scripts' digits that L{int} takes.
        """
        for text in ("", "+1", "-1", "1_000", " 1", "1 ", "٣", "²", "1.0", "0x10"):
            with self.subTest(text):
                self.assertFalse(isNumber(text))
                with self.assertRaises(ValueError) as e:
                    parseCount(text)
                self.assertEqual(str(e.exception), f'"{text}" is not a number')


class HostNameTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for name, label in (
            ("relay.example.com", "relay.example.com"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("Relay.Example", "relay.example"),
        ):
            with self.subTest(name):
                self.assertEqual(toALabel(name), label)

    def test_invalid(self) -> None:
        for name in ("", "a..b", "-relay.example"):
            with self.subTest(name):
                with self.assertRaises(ValueError) as e:
                    toALabel(name)
                self.assertTrue(
                    str(e.exception).startswith(f'"{name}" is not a valid host name ('),
                    str(e.exception),
                )


class DurationTests(SynchronousTestCase):
    VALID: ClassVar[list[Any]] = [
        ("0", 0.0),
        ("0s", 0.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("12m", 720.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("250ms", 0.25),
        ("1m30s500ms", 90.5),
        ("10us", 1e-05),
        ("10µs", 1e-05),
        ("10μs", 1e-05),
        ("100ns", 1e-07),
        ("1s1s", 2.0),
    ]
    INVALID: ClassVar[list[str]] = [
        "",
        "5",
        "1d",
        "-5m",
        "+5m",
        "5 m",
        "m",
        "1.5",
        "5M",
        "1h-30m",
        "s5",
        "1..5s",
        "0x10s",
    ]

    def test_valid(self) -> None:
        for text, seconds in self.VALID:
            with self.subTest(text):
                self.assertEqual(parseDuration(text), seconds)

    def test_invalid(self) -> None:
        for text in self.INVALID:
            with self.subTest(text):
                self.assertRaises(ValueError, parseDuration, text)

    def test_message(self) -> None:
        with self.assertRaises(ValueError) as e:
            parseDuration("1d")
        self.assertIn('"1d" is not a duration', str(e.exception))

    def test_format(self) -> None:
        for seconds, text in [
            (0, "0"),
            (30, "30s"),
            (300, "5m"),
            (5400, "1h30m"),
            (0.25, "250ms"),
            (90.5, "1m30s500ms"),
            (1e-07, "100ns"),
        ]:
            with self.subTest(text):
                self.assertEqual(formatDuration(seconds), text)

    @given(st.integers(min_value=0, max_value=10**15))
    def test_roundTrip(self, nanoseconds: int) -> None:
        """
        Formatting a whole number of nanoseconds and parsing it back gives
        the same duration.
        """
        seconds = nanoseconds / 10**9
        self.assertEqual(parseDuration(formatDuration(seconds)), seconds)

    @given(st.lists(st.sampled_from(["1h", "30m", "0.5s", "20ms", "7us"]), min_size=1))
    def test_concatenation(self, parts: list[str]) -> None:
        """
        A concatenation is the sum of its parts.
        """
        self.assertAlmostEqual(
            parseDuration("".join(parts)), sum(parseDuration(p) for p in parts), places=6
        )


class SizeTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for text, size in [
            ("0", 0),
            ("100", 100),
            ("100B", 100),
            ("512K", 512 * 1024),
            ("32M", 32 * 1024**2),
            ("1G", 1024**3),
            ("32m", 32 * 1024**2),
            ("2T", 2 * 1024**4),
        ]:
            with self.subTest(text):
                self.assertEqual(parseSize(text), size)

    def test_invalid(self) -> None:
        for text in ["", "M", "1.5M", "-1", "32 M", "32MB", "1KB", "10X", "١٠"]:
            with self.subTest(text):
                self.assertRaises(ValueError, parseSize, text)

    def test_format(self) -> None:
        for size, text in [
            (0, "0"),
            (100, "100"),
            (1024, "1K"),
            (32 * 1024**2, "32M"),
            (1536, "1536"),
            (1024**3, "1G"),
        ]:
            with self.subTest(text):
                self.assertEqual(formatSize(size), text)

    @given(st.integers(min_value=0, max_value=2**50))
    def test_roundTrip(self, size: int) -> None:
        self.assertEqual(parseSize(formatSize(size)), size)


class AddressTests(SynchronousTestCase):
    VALID: ClassVar[list[Any]] = [
        ("tcp://127.0.0.1:25", Address("tcp", host="127.0.0.1", port=25)),
        ("tcp://mx.example.net:587", Address("tcp", host="mx.example.net", port=587)),
        ("tls://smtp.example.net:465", Address("tls", host="smtp.example.net", port=465)),
        ("tcp:mx.example.net:25", Address("tcp", host="mx.example.net", port=25)),
        ("tls:mx.example.net:465", Address("tls", host="mx.example.net", port=465)),
        ("TCP://Host:25", Address("tcp", host="Host", port=25)),
        ("tcp://[::1]:25", Address("tcp", host="::1", port=25)),
        ("tls://[2001:db8::1]:465", Address("tls", host="2001:db8::1", port=465)),
        ("tcp:[::]:2525", Address("tcp", host="::", port=2525)),
        ("tcp://0.0.0.0:65535", Address("tcp", host="0.0.0.0", port=65535)),
        ("tcp://host:1", Address("tcp", host="host", port=1)),
        ("unix:///run/dovecot/lmtp", Address("unix", path="/run/dovecot/lmtp")),
        ("unix:/run/lmtp", Address("unix", path="/run/lmtp")),
        ("unix:relative/lmtp.sock", Address("unix", path="relative/lmtp.sock")),
    ]
    INVALID: ClassVar[list[Any]] = [
        ("mx.example.net:25", "missing scheme"),
        ("mx.example.net", "missing scheme"),
        ("://x:25", "missing scheme"),
        ("http://x:80", 'unsupported scheme "http"'),
        ("udp://x:25", 'unsupported scheme "udp"'),
        ("tcp://x", "missing port"),
        ("tcp://x:", '"" is not a port number'),
        ("tcp://x:smtp", '"smtp" is not a port number'),
        ("tcp://x:0", "port 0 is out of range"),
        ("tcp://x:65536", "port 65536 is out of range"),
        ("tcp://x:-1", "is not a port number"),
        ("tcp://:25", "missing host"),
        ("tcp://::1:25", "put IPv6 addresses in brackets"),
        ("tcp://[::1]", "missing port"),
        ("tcp://[::1:25", "missing ]"),
        ("tcp://[example]:25", '"example" is not an IPv6 address'),
        ("tcp://x/y:25", "is not a host name"),
        ("tcp://u@x:25", "is not a host name"),
        ("unix:", "missing socket path"),
        ("unix://", "use unix:///absolute/path"),
        ("unix://host/path", "use unix:///absolute/path"),
    ]

    def test_valid(self) -> None:
        for text, address in self.VALID:
            with self.subTest(text):
                self.assertEqual(parseAddress(text), address)

    def test_invalid(self) -> None:
        for text, message in self.INVALID:
            with self.subTest(text):
                with self.assertRaises(ValueError) as e:
                    parseAddress(text)
                self.assertIn(message, str(e.exception))
                self.assertTrue(str(e.exception).startswith(f'"{text}": '))

    @given(
        st.sampled_from(["tcp", "tls"]),
        st.one_of(
            st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}\.)*[a-z]{1,10}", fullmatch=True),
            st.ip_addresses().map(str),
        ),
        st.integers(min_value=1, max_value=65535),
    )
    def test_roundTrip(self, scheme: str, host: str, port: int) -> None:
        """
        C{str(Address)} parses back to the same address.
        """
        address = Address(scheme, host=host, port=port)  # type: ignore[arg-type]  # the strategy draws scheme from the Literal's words
        self.assertEqual(parseAddress(str(address)), address)

    def test_unixRoundTrip(self) -> None:
        address = Address("unix", path="/run/x.sock")
        self.assertEqual(parseAddress(str(address)), address)


class NetworkTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for text, network in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("192.0.2.1", "192.0.2.1/32"),
            ("::1", "::1/128"),
            ("2001:db8::/32", "2001:db8::/32"),
        ]:
            with self.subTest(text):
                self.assertEqual(parseNetwork(text), ipaddress.ip_network(network))

    def test_invalid(self) -> None:
        for text in ["10.0.0.1/8", "10.0.0.0/33", "example.org", "", "10/8x"]:
            with self.subTest(text):
                with self.assertRaises(ValueError) as e:
                    parseNetwork(text)
                self.assertTrue(str(e.exception).startswith(f'"{text}" is not a network'))


class ProtocolsTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parseProtocols(("tls1.2",)), ("tls1.2", None))
        self.assertEqual(parseProtocols(("tls1.0", "tls1.3")), ("tls1.0", "tls1.3"))
        self.assertEqual(parseProtocols(("tls1.3", "tls1.3")), ("tls1.3", "tls1.3"))

    def test_invalid(self) -> None:
        for args, message in [
            ((), "expected MIN [MAX]"),
            (("tls1.0", "tls1.2", "tls1.3"), "expected MIN [MAX]"),
            (("ssl3",), 'unknown version "ssl3"'),
            (("tls1.2", "TLS1.3"), 'unknown version "TLS1.3"'),
            (("tls1.3", "tls1.2"), "tls1.3 is newer than tls1.2"),
        ]:
            with self.subTest(args):
                with self.assertRaises(ValueError) as e:
                    parseProtocols(args)
                self.assertIn(message, str(e.exception))
