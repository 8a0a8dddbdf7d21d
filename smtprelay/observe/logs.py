"""
Log observers for twistd: NDJSON or text, with AUTH secrets redacted.

C{twistd --logger smtprelay.observe.logs.jsonObserver} (or C{textObserver}) calls the
named factory with no arguments; the observer writes to the file named by
C{SMTPRELAY_LOG_FILE} (appending) or to standard output.  JSON lines carry
C{time}, C{level}, C{namespace}, C{message} and the event's own structured
keys (e.g. the per-transaction keys of L{smtprelay.relay.session}).  Both observers
sit behind L{RedactingObserver}, a defence in depth that hides C{AUTH}
initial responses and the client's answers to C{334} challenges.

L{logReject} is the one form of the line for a refused command, Postfix's
C{NOQUEUE: reject: RCPT from ...}, whoever refused it (the relay or the
downstream).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import IO, Any, Callable, Hashable, Iterator

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    Logger,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import implementer

from smtprelay.interfaces import ClientSession
from smtprelay.protocol.replies import Reply

LOG_FILE_VARIABLE = "SMTPRELAY_LOG_FILE"
"""The environment variable naming the file the observers append to."""

MASK = "****"

_RESERVED = ("time", "level", "namespace", "message")
# Keys that twisted.python.log adds to every legacy event; noise in JSON.
_LEGACY = frozenset({"message", "time", "system", "isError", "format", "why", "failure"})
_MAX_DEPTH = 4

# "AUTH PLAIN dXNl…", "AUTH LOGIN dXNl…": any mechanism's initial response.
_AUTH = re.compile(r"""(?i)(\bAUTH[ \t]+[A-Z0-9_-]+[ \t]+)([^\s'"]+)""")
# A line holding a 334 reply (maybe after a trace prefix such as "S: ", or
# inside the repr of bytes).
_CHALLENGE = re.compile(r"""(?:^|[\s:>'"])334(?=[-\s'"]|$)""")
# A client's answer to a challenge: one base64 token, maybe after "C: ",
# maybe as the repr of bytes.
_RESPONSE = re.compile(
    r"""^(?P<prefix>(?:.*\bC:[ \t]*)?(?:b?')?)(?P<token>[A-Za-z0-9+/]+=*)(?P<suffix>'?)[ \t]*$"""
)
_LINES = re.compile(r"(\r\n|\r|\n)")
# Every base64 token has 4 characters or more; shorter ones are not hunted
# for in the event's values (they would mangle innocent text), but the
# message still shows them masked.
_MIN_SCRUB = 4


_REJECT = "{session}: reject: {command} from {client}: {reply};"
_REJECT_TAIL = " proto={proto} helo=<{helo}> relay={relay}"


def logReject(
    log: Logger,
    session: ClientSession,
    command: str,
    reply: Reply,
    sender: bytes | None,
    recipient: bytes | None = None,
    relay: str = "none",
) -> None:
    """
    Log the refusal of a client's C{MAIL}, C{RCPT} or C{DATA}, as Postfix
    logs C{NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 550 5.1.1 <x@y>:
    ...; from=<a@b> to=<x@y> proto=ESMTP helo=<h>}: the reply the client
    got and the envelope so far.  The event's keys: C{reject} (true),
    C{session}, C{command}, C{client}, C{reply}, C{sender} and
    C{recipient} (L{None} when not known: not shown), C{proto}, C{helo}
    and C{relay}, the downstream session of the transaction (C{none} for
    the relay's own refusals before one is open).
    """
    fromText = None if sender is None else sender.decode("utf-8", "replace")
    to = None if recipient is None else recipient.decode("utf-8", "replace")
    log.info(
        _REJECT
        + ("" if fromText is None else " from=<{sender}>")
        + ("" if to is None else " to=<{recipient}>")
        + _REJECT_TAIL,
        reject=True,
        session=session.id,
        command=command,
        # No reverse DNS lookups, so the name is Postfix's "unknown".
        client=f"unknown[{session.clientHost}]" if session.clientHost else "local",
        reply=reply.summary,
        sender=fromText,
        recipient=to,
        proto=session.withProtocol,
        helo=session.heloName or "",
        relay=relay,
    )


def logFormatted(log: Logger, text: str, **fields: object) -> None:
    """
    Log C{text}, already formatted by the caller, as an C{info} event with
    C{fields} as its keys (the JSON observer's fields, as with a format).

    twisted.logger renders an event's format with C{string.Formatter} in
    Python for each observer that shows the message; a line the relay logs
    per message (the transaction line) is cheaper formatted once with an
    f-string: the event's format is then the text itself, its braces
    escaped.
    """
    log.info(text.replace("{", "{{").replace("}", "}}"), **fields)


def redact(text: str) -> str:
    """
    Mask AUTH initial responses and, in multi-line text, each line that
    answers a C{334} challenge.

    @return: C{text} with every secret replaced by C{****}.
    """
    return _redact(text, False)[0]


def _redact(text: str, afterChallenge: bool) -> tuple[str, list[str], bool]:
    """
    @param afterChallenge: the previous text (another event of the same
        session) ended with a C{334} challenge, so the first line of this
        one is the client's answer.
    @return: the redacted text, the secrets found, and whether C{text}
        ends with a C{334} challenge.
    """
    secrets: list[str] = []
    parts = _LINES.split(text)
    for i in range(0, len(parts), 2):
        line = parts[i]
        if i and i == len(parts) - 1 and line == "":
            break  # a trailing newline: the last line's state stands
        if afterChallenge:
            response = _RESPONSE.match(line)
            if response is not None:
                secrets.append(response.group("token"))
                line = response.group("prefix") + MASK + response.group("suffix")
        secrets.extend(m.group(2) for m in _AUTH.finditer(line) if m.group(2) != "=")
        line = _AUTH.sub(lambda m: m.group(1) + (m.group(2) if m.group(2) == "=" else MASK), line)
        parts[i] = line
        afterChallenge = _CHALLENGE.search(line) is not None
    return "".join(parts), secrets, afterChallenge


def _mightHoldSecret(text: str) -> bool:
    return "334" in text or "auth" in text.lower()


@implementer(ILogObserver)
class RedactingObserver:
    """
    Pass events on to C{wrapped} with AUTH secrets masked in the message
    and in every string (or bytes) value.

    A C{334} challenge at the end of one event makes the first line of the
    next event of the same session (its C{session} or C{peer} key) an
    answer to mask: debug traces log one line per event.  Events are never
    changed in place (other observers see the same dict).
    """

    maxSessions = 1000

    def __init__(self, wrapped: ILogObserver) -> None:
        self.wrapped = wrapped
        self._challenged: OrderedDict[Hashable, None] = OrderedDict()

    def __call__(self, event: LogEvent) -> None:
        key = _sessionKey(event)
        pending = key in self._challenged
        if pending:
            del self._challenged[key]
        if not pending and not any(_mightHoldSecret(s) for s in _strings(event)):
            self.wrapped(event)
            return
        original = formatEvent(event)
        text, secrets, challenged = _redact(original, pending)
        if challenged:
            self._challenged[key] = None
            while len(self._challenged) > self.maxSessions:
                self._challenged.popitem(last=False)
        scrub = _scrubber(secrets)
        redacted = {name: _mapStrings(value, scrub) for name, value in event.items()}
        if text != original:
            redacted["log_format"] = text.replace("{", "{{").replace("}", "}}")
        self.wrapped(redacted)


def _sessionKey(event: LogEvent) -> Hashable:
    for name in ("session", "peer"):
        value = event.get(name)
        if isinstance(value, (str, bytes, int)):
            return (event.get("log_namespace"), name, value)
    return (event.get("log_namespace"), None, None)


def _strings(value: Any, depth: int = 0) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, bytes):
        yield value.decode("latin-1")
    elif value is None or isinstance(value, (int, float)):
        return  # most values: no text, and no container to look into
    elif depth < _MAX_DEPTH and isinstance(value, Mapping):
        for item in value.values():
            yield from _strings(item, depth + 1)
    elif depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item, depth + 1)


def _scrubber(secrets: list[str]) -> Callable[[str], str]:
    hunted = sorted({s for s in secrets if len(s) >= _MIN_SCRUB}, key=len, reverse=True)

    def scrub(text: str) -> str:
        text = redact(text)
        for secret in hunted:
            text = text.replace(secret, MASK)
        return text

    return scrub


def _mapStrings(value: Any, scrub: Callable[[str], str], depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, bytes):
        return scrub(value.decode("latin-1")).encode("latin-1")
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple)):
        return type(value)(_mapStrings(item, scrub, depth + 1) for item in value)
    if depth < _MAX_DEPTH and isinstance(value, dict):
        return {k: _mapStrings(v, scrub, depth + 1) for k, v in value.items()}
    return value


def eventAsJSONLine(event: LogEvent) -> str:
    """
    One event as one line of JSON (NDJSON: no RFC 7464 record separator).

    Values that JSON cannot hold become their C{str()}; C{log_*} keys stay
    out, except as C{time}, C{level}, C{namespace} and C{message}, and a
    failure's C{traceback}.
    """
    record: dict[str, Any] = {
        "time": _isoTime(event.get("log_time")),
        "level": getattr(event.get("log_level"), "name", None),
        "namespace": event.get("log_namespace"),
        "message": formatEvent(event),
    }
    legacy = "isError" in event
    for name, value in event.items():
        if not isinstance(name, str) or name.startswith("log_") or name in _RESERVED:
            continue
        if legacy and name in _LEGACY:
            continue
        record[name] = _jsonValue(value)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = _safeStr(failure)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _isoTime(when: Any) -> str | None:
    if not isinstance(when, (int, float)):
        return None
    stamp = datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _jsonValue(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if depth < _MAX_DEPTH and isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonValue(item, depth + 1) for item in value]
    if depth < _MAX_DEPTH and isinstance(value, Mapping):
        return {_safeStr(k): _jsonValue(v, depth + 1) for k, v in value.items()}
    return _safeStr(value)


def _safeStr(value: Any) -> str:
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def jsonFileObserver(outFile: IO[str]) -> ILogObserver:
    """
    An observer that writes each event to C{outFile} as one JSON line and
    flushes (no redaction: see L{jsonObserver}).
    """
    return FileLogObserver(outFile, eventAsJSONLine)


def _output(environ: Mapping[str, str] | None) -> IO[str]:
    path = (os.environ if environ is None else environ).get(LOG_FILE_VARIABLE, "")
    if path:
        return open(path, "a", encoding="utf-8")
    return sys.stdout


def jsonObserver(
    outFile: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> ILogObserver:
    """
    The redacting NDJSON observer, for C{twistd --logger
    smtprelay.observe.logs.jsonObserver}.

    @param outFile: where to write; by default the file named by
        C{SMTPRELAY_LOG_FILE} in C{environ} (appended to), else stdout.
    @param environ: the environment to read (default: C{os.environ}).
    """
    return RedactingObserver(jsonFileObserver(outFile or _output(environ)))


def textObserver(
    outFile: IO[str] | None = None, environ: Mapping[str, str] | None = None
) -> ILogObserver:
    """
    The redacting classic text observer (twistd's own format), for
    C{twistd --logger smtprelay.observe.logs.textObserver}.

    @param outFile: as for L{jsonObserver}.
    @param environ: as for L{jsonObserver}.
    """
    return RedactingObserver(textFileLogObserver(outFile or _output(environ)))
