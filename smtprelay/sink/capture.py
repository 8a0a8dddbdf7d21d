"""
A capture sink: an SMTP/LMTP server on the inbound engine that accepts
every message and writes it to a directory, for tests and demos.

Each message becomes C{ID.eml} (the exact message bytes, unstuffed) and
C{ID.json} (its envelope), written once its end-of-data arrives; the body
streams to a temporary file, so memory stays flat.  A script can make any
command, recipient or (LMTP) per-recipient final reply fail.  The
C{smtprelay-sink} twistd plugin is L{SinkOptions} + L{makeService}.
"""

from __future__ import annotations

import ipaddress
import json
import os
from typing import IO, Any, Callable, Mapping, Sequence, Union

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, UNIXServerEndpoint
from twisted.internet.interfaces import IPushProducer, IStreamServerEndpoint
from twisted.python import usage
from zope.interface import implementer

from smtprelay.protocol import replies
from smtprelay.net.address import Address
from smtprelay.interfaces import ClientSession, IRelayHandler, Params
from smtprelay.protocol.replies import Reply, reply
from smtprelay.inbound.factory import SMTPServerFactory
from smtprelay.inbound.policy import ConnectionLimits, SessionPolicy

ScriptValue = Union[str, Reply]
"""A scripted reply: a L{Reply} or its text (C{"451 4.3.0 try later"})."""

_ANYWHERE = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def _asReply(value: ScriptValue) -> Reply:
    if isinstance(value, Reply):
        return value
    return Reply.fromLines([value.encode("utf-8")]).withEnhanced()


def _scriptKey(key: str) -> str:
    """
    C{"RCPT:Bob@x"} → C{"rcpt:Bob@x"}: the command part is case-insensitive.
    """
    command, colon, address = key.partition(":")
    return command.lower() + colon + address


@implementer(IRelayHandler)
class CaptureHandler:
    """
    An L{IRelayHandler} that accepts everything (unless scripted otherwise)
    and writes each message into C{directory}.

    Script keys: C{"auth"}, C{"mail"}, C{"rcpt"}, C{"rcpt:ADDRESS"},
    C{"data"}, C{"eod"} and C{"eod:ADDRESS"} (LMTP per recipient).

    @ivar messages: ids of the messages written by this session.
    """

    def __init__(
        self,
        session: ClientSession,
        directory: str,
        script: Mapping[str, ScriptValue] | None = None,
    ) -> None:
        self.session = session
        self._directory = directory
        self._script = {_scriptKey(key): _asReply(value) for key, value in (script or {}).items()}
        self.messages: list[str] = []
        self._file: IO[bytes] | None = None
        self._tempPath = ""
        self._reset()

    def _reset(self) -> None:
        self._discard()
        self._sender: bytes | None = None
        self._mailParams: dict[str, str | None] = {}
        self._recipients: list[tuple[bytes, dict[str, str | None]]] = []
        self._size = 0

    def _scripted(self, key: str, default: Reply) -> Reply:
        return self._script.get(key, default)

    def authenticate(self, mechanism: str, username: str, password: str) -> Deferred[Reply]:
        return succeed(self._scripted("auth", replies.AUTH_OK))

    def mail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        self._reset()
        result = self._scripted("mail", replies.MAIL_OK)
        if result.positive:
            self._sender = sender
            self._mailParams = dict(params)
        return succeed(result)

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        address = recipient.decode("utf-8", "replace")
        result = self._scripted("rcpt:" + address, self._scripted("rcpt", replies.RCPT_OK))
        if result.positive:
            self._recipients.append((recipient, dict(params)))
        return succeed(result)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        result = self._scripted("data", replies.START_INPUT)
        if result.code == 354:
            self._tempPath = os.path.join(
                self._directory, f".{self.session.id}-{len(self.messages) + 1}.tmp"
            )
            self._file = open(self._tempPath, "wb")
        return succeed(result)

    def dataChunk(self, chunk: bytes) -> None:
        if self._file is not None:
            self._file.write(chunk)
            self._size += len(chunk)

    def endData(self) -> Deferred[Sequence[Reply]]:
        messageId = f"{self.session.id}-{len(self.messages) + 1}"
        final = self._scripted("eod", reply(250, "2.0.0", f"Ok: queued as {messageId}"))
        if self.session.protocol == "lmtp":
            results = [
                self._scripted("eod:" + r.decode("utf-8", "replace"), final)
                for r, _ in self._recipients
            ]
        else:
            results = [final]
        if any(r.positive for r in results) and self._file is not None:
            self._file.close()
            self._file = None
            os.replace(self._tempPath, os.path.join(self._directory, messageId + ".eml"))
            self._writeEnvelope(messageId)
            self.messages.append(messageId)
        self._reset()
        return succeed(results)

    def _writeEnvelope(self, messageId: str) -> None:
        session = self.session
        envelope: dict[str, Any] = {
            "id": messageId,
            "mail_from": (self._sender or b"").decode("utf-8", "replace"),
            "rcpt_to": [r.decode("utf-8", "replace") for r, _ in self._recipients],
            "params": {
                "mail": self._mailParams,
                "rcpt": [params for _, params in self._recipients],
            },
            "helo": session.heloName,
            "protocol": session.withProtocol,
            "client": session.clientHost or "unix",
            "user": session.user,
            "tls": None if session.tls is None else {
                "version": session.tls.version, "cipher": session.tls.cipher,
            },
            "size": self._size,
        }
        path = os.path.join(self._directory, messageId + ".json")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(envelope, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(path + ".tmp", path)

    def _discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            try:
                os.remove(self._tempPath)
            except OSError:
                pass

    def abortData(self, reply: Reply) -> None:
        self._reset()

    def reset(self) -> None:
        self._reset()

    def close(self) -> None:
        self._reset()


def sinkPolicy(lmtp: bool = False) -> SessionPolicy:
    """
    The session rules of a sink: relay from anywhere, default limits, which
    spare every client as they spare a listener's C{allow} networks.
    """
    return SessionPolicy(
        kind="lmtp" if lmtp else "smtp",
        allow=_ANYWHERE,
        limits=ConnectionLimits(exceptions=_ANYWHERE),
    )


def _endpoint(reactor: Any, address: Address) -> IStreamServerEndpoint:
    if address.scheme == "unix":
        return UNIXServerEndpoint(reactor, address.path)
    if address.scheme != "tcp":
        raise ValueError(f"{address}: the sink listens on tcp:// or unix:// only")
    if ":" in address.host:
        return TCP6ServerEndpoint(reactor, address.port, interface=address.host)
    return TCP4ServerEndpoint(reactor, address.port, interface=address.host or "0.0.0.0")


def makeSinkFactory(
    policy: SessionPolicy,
    directory: str,
    script: Mapping[str, ScriptValue] | None,
    reactor: Any,
    hostname: str = "sink.invalid",
) -> SMTPServerFactory:
    """
    A server factory whose sessions are L{CaptureHandler}s writing into
    C{directory}.
    """
    handlerFactory: Callable[[ClientSession], IRelayHandler] = (
        lambda session: CaptureHandler(session, directory, script)
    )
    return SMTPServerFactory(policy, handlerFactory, hostname, reactor)


def makeSinkService(
    listenAddresses: Sequence[Address | str],
    directory: str,
    lmtp: bool = False,
    script: Mapping[str, ScriptValue] | None = None,
    reactor: Any = None,
    hostname: str = "sink.invalid",
) -> MultiService:
    """
    A service that runs a capture sink on C{listenAddresses}.

    @param listenAddresses: L{Address}es or their text (C{tcp://HOST:PORT},
        C{unix:///path}).
    @param directory: where messages go (created if missing).
    @param lmtp: speak LMTP instead of SMTP.
    @param script: scripted replies (see L{CaptureHandler}).
    """
    from smtprelay.net.address import parseAddress

    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    addresses = [a if isinstance(a, Address) else parseAddress(a) for a in listenAddresses]
    os.makedirs(directory, exist_ok=True)
    factory = makeSinkFactory(sinkPolicy(lmtp), directory, script, reactor, hostname)
    service = MultiService()
    for address in addresses:
        StreamServerEndpointService(_endpoint(reactor, address), factory).setServiceParent(service)
    return service


class SinkOptions(usage.Options):
    """
    Options of C{twistd smtprelay-sink}.
    """

    synopsis = "--listen ADDRESS [--listen ADDRESS ...] --dir DIR [--lmtp] [--script FILE]"
    longdesc = (
        "A capture sink: accepts every message and writes ID.eml (the message) and "
        "ID.json (its envelope) into DIR.  A script (JSON) can refuse commands, e.g. "
        '{"mail": "451 4.3.0 try later", "rcpt:bad@example.org": "550 5.1.1 no such user", '
        '"eod:user@example.org": "452 4.2.2 mailbox full"}.  '
        "Example: twistd -n smtprelay-sink --listen tcp://127.0.0.1:2526 --dir /tmp/mail"
    )
    optFlags = [["lmtp", None, "Speak LMTP instead of SMTP."]]
    optParameters = [
        ["dir", "d", None, "Directory for captured messages (required)."],
        ["script", "s", None, "JSON file with scripted replies."],
        ["hostname", None, "sink.invalid", "Name in the greeting."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, address: str) -> None:
        """
        Listen on ADDRESS (tcp://HOST:PORT or unix:///path); repeatable.
        Default: tcp://127.0.0.1:2525.
        """
        from smtprelay.net.address import parseAddress

        try:
            self["listen"].append(parseAddress(address))
        except ValueError as e:
            raise usage.UsageError(str(e))

    def postOptions(self) -> None:
        if not self["dir"]:
            raise usage.UsageError("--dir is required")
        if not self["listen"]:
            self["listen"] = [Address("tcp", "127.0.0.1", 2525)]
        for address in self["listen"]:
            if address.scheme == "tls":
                raise usage.UsageError(f"{address}: the sink listens on tcp:// or unix:// only")
        self["scriptData"] = None
        if self["script"]:
            try:
                with open(self["script"], encoding="utf-8") as f:
                    data = json.load(f)
                script = {str(k): _asReply(str(v)) for k, v in data.items()}
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"{self['script']}: {e}")
            self["scriptData"] = script


def makeService(options: SinkOptions) -> MultiService:
    """
    The C{smtprelay-sink} service from parsed options.
    """
    return makeSinkService(
        options["listen"], options["dir"], options["lmtp"], options["scriptData"],
        hostname=options["hostname"],
    )
