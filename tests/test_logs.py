"""
Tests for L{smtprelay.observe.logs}: exact NDJSON lines, and that no form of AUTH
secret gets through L{RedactingObserver}.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from typing import Callable

from twisted.application.app import AppLogger
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.log import textFromEventDict
from twisted.logger._legacy import publishToNewObserver
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from smtprelay.interfaces import ClientSession
from smtprelay.protocol.replies import reply
from smtprelay.observe.logs import (
    LOG_FILE_VARIABLE,
    RedactingObserver,
    eventAsJSONLine,
    jsonFileObserver,
    jsonObserver,
    logFormatted,
    logReject,
    redact,
    textObserver,
)

USER = "alice"
PASSWORD = "s3cr3t-Pa55w0rd"


def b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


PLAIN = b64(f"\0{USER}\0{PASSWORD}")
LOGIN_USER = b64(USER)
LOGIN_PASSWORD = b64(PASSWORD)
FORBIDDEN = [PASSWORD, PLAIN, LOGIN_PASSWORD, LOGIN_USER]

# Mon, 2025-11-24 22:40:00.123 UTC
WHEN = 1764024000.123

TRANSACTION: LogEvent = {
    "log_format": "{session}: from=<{sender}> to={to} size={size} relay={relay} "
    "tls={tls} delay={delay:.3f} status={status} reply={reply}",
    "log_level": LogLevel.info,
    "log_namespace": "smtprelay.relay.session.RelaySession",
    "log_time": WHEN,
    "log_logger": object(),
    "log_source": object(),
    "session": "S1",
    "client": "192.0.2.7",
    "helo": "client.example",
    "sender": "a@example.org",
    "to": 2,
    "size": 1234,
    "relay": "mx.example.net[198.51.100.1]:25",
    "tls": True,
    "delay": 0.25,
    "status": "sent",
    "reply": "250 2.0.0 Ok: queued as 4ABC",
    "transaction": True,
}


@implementer(ILogObserver)
class Capture:
    """
    A plain observer that keeps the events it is given.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


@implementer(ILogObserver)
class _Observer:
    def __init__(self, function: Callable[[LogEvent], None]) -> None:
        self._function = function

    def __call__(self, event: LogEvent) -> None:
        self._function(event)


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


class JSONTests(SynchronousTestCase):
    """
    L{eventAsJSONLine}, L{jsonFileObserver} and L{jsonObserver}.
    """

    def test_transactionLine(self) -> None:
        """
        The transaction event of L{smtprelay.relay.session} is one exact JSON line.
        """
        line = eventAsJSONLine(TRANSACTION)
        self.assertEqual(
            line,
            '{"time":"2025-11-24T22:40:00.123Z","level":"info",'
            '"namespace":"smtprelay.relay.session.RelaySession",'
            '"message":"S1: from=<a@example.org> to=2 size=1234 '
            "relay=mx.example.net[198.51.100.1]:25 tls=True delay=0.250 status=sent "
            'reply=250 2.0.0 Ok: queued as 4ABC",'
            '"session":"S1","client":"192.0.2.7","helo":"client.example",'
            '"sender":"a@example.org","to":2,"size":1234,'
            '"relay":"mx.example.net[198.51.100.1]:25","tls":true,"delay":0.25,'
            '"status":"sent","reply":"250 2.0.0 Ok: queued as 4ABC","transaction":true}\n',
        )

    def test_observerWritesNDJSON(self) -> None:
        """
        One line per event, each a JSON object, no RFC 7464 separator.
        """
        out = io.StringIO()
        log = Logger(namespace="smtprelay.test", observer=jsonFileObserver(out))
        log.info("first {n}", n=1)
        log.warn("second\nline")
        data = out.getvalue()
        self.assertNotIn("\x1e", data)
        lines = data.split("\n")
        self.assertEqual(lines[-1], "")
        first, second = (json.loads(line) for line in lines[:-1])
        self.assertEqual(
            {k: first[k] for k in ("level", "namespace", "message", "n")},
            {"level": "info", "namespace": "smtprelay.test", "message": "first 1", "n": 1},
        )
        self.assertEqual((second["level"], second["message"]), ("warn", "second\nline"))
        self.assertRegex(first["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")

    def test_values(self) -> None:
        """
        Values JSON cannot hold become text; C{log_*} keys stay out; the
        reserved names are ours.
        """
        event: LogEvent = {
            "log_format": "x",
            "log_level": LogLevel.debug,
            "log_namespace": "n",
            "log_time": 0,
            "log_whatever": 1,
            "message": "spoof",
            "bytes": b"caf\xc3\xa9\xff",
            "nan": float("nan"),
            "inf": float("inf"),
            "list": [1, (2, "3"), {4}],
            "dict": {1: object, "k": None},
            "object": LogLevel.info,
            "unprintable": Unprintable(),
            "deep": [[[[[["too deep"]]]]]],
        }
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual(
            record,
            {
                "time": "1970-01-01T00:00:00.000Z",
                "level": "debug",
                "namespace": "n",
                "message": "x",
                "bytes": "caf\u00e9\\xff",
                "nan": "nan",
                "inf": "inf",
                "list": [1, [2, "3"], [4]],
                "dict": {"1": "<class 'object'>", "k": None},
                "object": str(LogLevel.info),
                "unprintable": "<unprintable Unprintable>",
                "deep": [[[[str([["too deep"]])]]]],
            },
        )

    def test_missingKeys(self) -> None:
        record = json.loads(eventAsJSONLine({}))
        self.assertEqual(record["time"], None)
        self.assertEqual(record["level"], None)
        self.assertEqual(record["namespace"], None)

    def test_legacyEvent(self) -> None:
        """
        An event from C{twisted.python.log.msg} has its text as message and
        none of the legacy keys.
        """
        capture = Capture()
        publishToNewObserver(
            capture,
            {"message": ("hello", "world"), "isError": 0, "system": "-", "time": WHEN},
            textFromEventDict,
        )
        [event] = capture.events
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual(
            record,
            {
                "time": "2025-11-24T22:40:00.123Z",
                "level": "info",
                "namespace": "log_legacy",
                "message": "hello world",
            },
        )

    def test_failure(self) -> None:
        out = io.StringIO()
        log = Logger(namespace="n", observer=jsonFileObserver(out))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("oops")
        record = json.loads(out.getvalue())
        self.assertEqual(record["message"], "oops")
        self.assertIn("ZeroDivisionError", record["traceback"])
        self.assertEqual(record["level"], "critical")

    def test_environmentFile(self) -> None:
        """
        C{SMTPRELAY_LOG_FILE} names a file that is appended to.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("earlier\n")
        observer = jsonObserver(environ={LOG_FILE_VARIABLE: path})
        self.addCleanup(lambda: observer.wrapped._outFile.close())  # type: ignore[attr-defined]  # the file the observer opened is private to it; closed for trial's temp dir
        observer(TRANSACTION)
        with open(path) as f:
            lines = f.read().split("\n")
        self.assertEqual(lines[0], "earlier")
        self.assertEqual(json.loads(lines[1])["session"], "S1")
        self.assertEqual(lines[2:], [""])

    def test_stdoutByDefault(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        jsonObserver(environ={})(TRANSACTION)
        self.assertEqual(out.getvalue(), eventAsJSONLine(TRANSACTION))
        out.truncate(0)
        out.seek(0)
        jsonObserver(environ={LOG_FILE_VARIABLE: ""})(TRANSACTION)
        self.assertEqual(out.getvalue(), eventAsJSONLine(TRANSACTION))

    def test_twistdLogger(self) -> None:
        """
        C{twistd --logger smtprelay.observe.logs.jsonObserver} resolves our factory,
        and twistd's L{AppLogger} calls it with no arguments to get an
        L{ILogObserver}.
        """
        options = ServerOptions()
        options.parseOptions(["--logger", "smtprelay.observe.logs.jsonObserver", "--nodaemon"])
        self.assertIs(options["logger"], jsonObserver)
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        observer = AppLogger(options)._observerFactory()
        self.assertTrue(ILogObserver.providedBy(observer))
        observer(TRANSACTION)
        self.assertEqual(json.loads(out.getvalue())["status"], "sent")


class FormattedTests(SynchronousTestCase):
    """
    L{logFormatted}: a line formatted by the caller is the event's message
    as given, braces included, and its keys are the JSON fields.
    """

    def test_textAndKeys(self) -> None:
        events: list[LogEvent] = []
        log = Logger(namespace="test", observer=_Observer(events.append))
        logFormatted(log, "S1: from=<{a}@x> to=1 {0} {}", session="S1", to=1)
        [event] = events
        self.assertEqual(formatEvent(event), "S1: from=<{a}@x> to=1 {0} {}")
        self.assertEqual(event["log_level"], LogLevel.info)
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual((record["message"], record["session"], record["to"]),
                         ("S1: from=<{a}@x> to=1 {0} {}", "S1", 1))


class RejectLineTests(SynchronousTestCase):
    """
    L{logReject}: Postfix's C{NOQUEUE: reject} line with the relay's
    session id, as text and as JSON keys.
    """

    def capture(self) -> list[LogEvent]:
        events: list[LogEvent] = []
        self.log = Logger(namespace="test", observer=_Observer(events.append))
        return events

    def test_rcpt(self) -> None:
        events = self.capture()
        session = ClientSession(id="S1", protocol="smtp", clientHost="192.0.2.7",
                                heloName="client.example", esmtp=True)
        logReject(self.log, session, "RCPT", reply(550, "5.1.1", "<b@x>: unknown"), b"a@x", b"b@x",
                  "mx.example.net[198.51.100.1]:25")
        [event] = events
        self.assertEqual(
            formatEvent(event),
            "S1: reject: RCPT from unknown[192.0.2.7]: 550 5.1.1 <b@x>: unknown; from=<a@x> to=<b@x> "
            "proto=ESMTP helo=<client.example> relay=mx.example.net[198.51.100.1]:25",
        )
        record = json.loads(eventAsJSONLine(event))
        self.assertEqual(
            {k: v for k, v in record.items() if k not in ("time", "level", "namespace", "message")},
            {"reject": True, "session": "S1", "command": "RCPT", "client": "unknown[192.0.2.7]",
             "reply": "550 5.1.1 <b@x>: unknown", "sender": "a@x", "recipient": "b@x",
             "proto": "ESMTP", "helo": "client.example", "relay": "mx.example.net[198.51.100.1]:25"},
        )

    def test_unknownSenderOnUnixSocket(self) -> None:
        """
        Before a sender is known (a refused MAIL's unparsable argument) no
        C{from=} is shown; a unix socket client is C{local}.
        """
        events = self.capture()
        session = ClientSession(id="L1", protocol="lmtp", clientHost="")
        logReject(self.log, session, "MAIL", reply(501, "5.1.7", "Bad sender address syntax"), None)
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["L1: reject: MAIL from local: 501 5.1.7 Bad sender address syntax; "
             "proto=LMTP helo=<> relay=none"],
        )


class RedactTests(SynchronousTestCase):
    """
    L{redact} on text.
    """

    def test_authInitialResponses(self) -> None:
        for text, expected in [
            (f"AUTH PLAIN {PLAIN}", "AUTH PLAIN ****"),
            (f"auth plain {PLAIN}\r\n", "auth plain ****\r\n"),
            (f"C: AUTH LOGIN {LOGIN_USER}", "C: AUTH LOGIN ****"),
            (f"b'AUTH PLAIN {PLAIN}'", "b'AUTH PLAIN ****'"),
            (f"AUTH XOAUTH2 {PLAIN} extra", "AUTH XOAUTH2 **** extra"),
            ("AUTH PLAIN =", "AUTH PLAIN ="),
            ("AUTH PLAIN", "AUTH PLAIN"),
            ("MAIL FROM:<a@b> AUTH=<a@b>", "MAIL FROM:<a@b> AUTH=<a@b>"),
        ]:
            self.assertEqual(redact(text), expected)

    def test_challengeResponses(self) -> None:
        """
        In multi-line text, the line after a C{334} is masked, whatever the
        mechanism and trace prefix.
        """
        trace = (
            "C: AUTH LOGIN\r\n"
            "S: 334 VXNlcm5hbWU6\r\n"
            f"C: {LOGIN_USER}\r\n"
            "S: 334 UGFzc3dvcmQ6\r\n"
            f"C: {LOGIN_PASSWORD}\r\n"
            "S: 235 2.7.0 Authentication successful\r\n"
            "C: MAIL FROM:<a@b>\r\n"
        )
        self.assertEqual(
            redact(trace),
            "C: AUTH LOGIN\r\n"
            "S: 334 VXNlcm5hbWU6\r\n"
            "C: ****\r\n"
            "S: 334 UGFzc3dvcmQ6\r\n"
            "C: ****\r\n"
            "S: 235 2.7.0 Authentication successful\r\n"
            "C: MAIL FROM:<a@b>\r\n",
        )
        self.assertEqual(
            redact(f"AUTH PLAIN\n334 \n{PLAIN}\n235 ok"), "AUTH PLAIN\n334 \n****\n235 ok"
        )

    def test_nothingElse(self) -> None:
        for text in [
            "EHLO client\r\nMAIL FROM:<x@y> SIZE=334\r\n",
            "size=334 to=1",
            "S: 250 dXNlcm5hbWU6\nQUIT",
            "",
        ]:
            self.assertEqual(redact(text), text)


class RedactingObserverTests(SynchronousTestCase):
    """
    L{RedactingObserver} in front of other observers.
    """

    def setUp(self) -> None:
        self.capture = Capture()
        self.out = io.StringIO()
        self.json = io.StringIO()
        self.observers = [
            RedactingObserver(self.capture),
            textObserver(self.out),
            jsonObserver(self.json),
        ]

    def emit(self, event: LogEvent) -> None:
        for observer in self.observers:
            observer(event)

    def log(self, namespace: str = "smtprelay.outbound.client") -> Logger:
        return Logger(namespace=namespace, observer=_Observer(self.emit))

    def assertNoSecret(self) -> None:
        texts = [self.out.getvalue(), self.json.getvalue()] + [
            repr(event) for event in self.capture.events
        ]
        for text in texts:
            for secret in FORBIDDEN:
                self.assertNotIn(secret, text)
        self.assertIn("****", self.out.getvalue())
        self.assertIn("****", self.json.getvalue())

    def test_clientTraceLogin(self) -> None:
        """
        The client engine's debug trace, one line per event with the line as
        bytes: every answer to a 334 is masked, in the message and the key.
        """
        log = self.log()
        peer = "mx.example.net[198.51.100.1]:587"
        for side, line in [
            ("C", b"AUTH LOGIN"),
            ("S", b"334 VXNlcm5hbWU6"),
            ("C", LOGIN_USER.encode()),
            ("S", b"334 UGFzc3dvcmQ6"),
            ("C", LOGIN_PASSWORD.encode()),
            ("S", b"235 2.7.0 Authentication successful"),
            ("C", b"MAIL FROM:<a@b>"),
        ]:
            log.debug("{peer} " + side + ": {line}", peer=peer, line=line)
        self.assertNoSecret()
        lines = [json.loads(line)["message"] for line in self.json.getvalue().splitlines()]
        self.assertEqual(
            lines,
            [
                f"{peer} C: b'AUTH LOGIN'",
                f"{peer} S: b'334 VXNlcm5hbWU6'",
                f"{peer} C: b'****'",
                f"{peer} S: b'334 UGFzc3dvcmQ6'",
                f"{peer} C: b'****'",
                f"{peer} S: b'235 2.7.0 Authentication successful'",
                f"{peer} C: b'MAIL FROM:<a@b>'",
            ],
        )
        self.assertEqual(self.capture.events[4]["line"], b"****")

    def test_plainForms(self) -> None:
        log = self.log()
        log.debug("{peer} C: {line}", peer="p", line=f"AUTH PLAIN {PLAIN}".encode())
        log.info("client sent " + f"AUTH PLAIN {PLAIN}")  # formatted too early
        log.info("{session}: {command}", session="S2", command=f"auth plain {PLAIN}")
        log.info("{x}", x={"nested": [f"AUTH PLAIN {PLAIN}"]})
        log.debug("{peer} C: AUTH PLAIN", peer="q")
        log.debug("{peer} S: 334 ", peer="q")
        log.debug("{peer} C: {line}", peer="q", line=PLAIN)
        self.assertNoSecret()
        self.assertEqual(self.capture.events[-1]["line"], "****")
        self.assertEqual(self.capture.events[3]["x"], {"nested": ["AUTH PLAIN ****"]})

    def test_multiLineValue(self) -> None:
        log = self.log()
        log.debug(
            "trace {session}:\n{trace}",
            session="S3",
            trace=f"AUTH LOGIN {LOGIN_USER}\n334 UGFzc3dvcmQ6\n{LOGIN_PASSWORD}\n235 ok",
        )
        self.assertNoSecret()
        self.assertEqual(
            self.capture.events[0]["trace"], "AUTH LOGIN ****\n334 UGFzc3dvcmQ6\n****\n235 ok"
        )

    def test_sessionsApart(self) -> None:
        """
        A challenge in one session does not mask the next line of another,
        and the session that got the challenge still has its answer masked.
        """
        observer = RedactingObserver(self.capture)
        log = Logger(namespace="smtprelay.outbound.client", observer=observer)
        log.debug("{peer} S: 334 UGFzc3dvcmQ6", peer="a")
        log.debug("{peer} C: {line}", peer="b", line="RSET")
        log.debug("{peer} C: {line}", peer="a", line=LOGIN_PASSWORD)
        log.debug("{peer} C: {line}", peer="a", line="RSET")
        self.assertEqual(
            [event["line"] for event in self.capture.events[1:]], ["RSET", "****", "RSET"]
        )

    def test_shortPassword(self) -> None:
        """
        A short password's base64 is masked in every value of the event.
        """
        log = self.log()
        log.debug("{peer} S: {line}", peer="p", line=b"334 UGFzc3dvcmQ6")
        log.debug("{peer} C: {line}", peer="p", line=b"YWJj", copy=["x YWJj y"])
        self.assertEqual(self.capture.events[1]["line"], b"****")
        self.assertEqual(self.capture.events[1]["copy"], ["x **** y"])

    def test_challengeEndsWithNewline(self) -> None:
        observer = RedactingObserver(self.capture)
        log = Logger(namespace="smtprelay.outbound.client", observer=observer)
        log.debug("{peer} S: {line}", peer="a", line="334 UGFzc3dvcmQ6\r\n")
        log.debug("{peer} C: {line}", peer="a", line=LOGIN_PASSWORD)
        self.assertEqual(self.capture.events[1]["line"], "****")

    def test_messageAsRedacted(self) -> None:
        """
        The message shown is the redacted text even where no single value
        holds the secret.
        """
        self.observers = [RedactingObserver(self.capture)]
        self.log().info("{a}{b}", a="AUTH PLAIN ", b="QQ more")
        self.assertEqual(formatEvent(self.capture.events[0]), "AUTH PLAIN **** more")

    def test_untouched(self) -> None:
        """
        Events without secrets pass as they are; events with secrets are
        copied, never changed in place.
        """
        self.observers = [RedactingObserver(self.capture)]
        self.emit(TRANSACTION)
        self.assertIs(self.capture.events[0], TRANSACTION)
        event: LogEvent = {"log_format": "{line}", "line": f"AUTH PLAIN {PLAIN}"}
        self.emit(event)
        self.assertEqual(event, {"log_format": "{line}", "line": f"AUTH PLAIN {PLAIN}"})
        self.assertEqual(self.capture.events[1]["line"], "AUTH PLAIN ****")

    def test_braces(self) -> None:
        """
        A redacted message with braces in it is shown as it was.
        """
        self.observers = [textObserver(self.out)]
        self.log().info("{a} AUTH PLAIN " + PLAIN, a="{x}")
        self.assertIn("{x} AUTH PLAIN ****\n", self.out.getvalue())

    def test_boundedMemory(self) -> None:
        observer = RedactingObserver(self.capture)
        observer.maxSessions = 3
        for i in range(10):
            observer({"log_format": "S: 334 x", "session": f"S{i}"})
        self.assertEqual(len(observer._challenged), 3)

    def test_textObserverEnvironment(self) -> None:
        path = self.mktemp()
        observer = textObserver(environ={LOG_FILE_VARIABLE: path})
        self.addCleanup(lambda: observer.wrapped._outFile.close())  # type: ignore[attr-defined]  # the file the observer opened is private to it; closed for trial's temp dir
        Logger(namespace="n", observer=observer).info("AUTH PLAIN " + PLAIN)
        with open(path) as f:
            text = f.read()
        self.assertIn("AUTH PLAIN ****", text)
        self.assertNotIn(PLAIN, text)
