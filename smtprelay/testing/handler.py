"""
A recording, scriptable L{IRelayHandler} for tests of anything that drives
one (the inbound engine, or a user's own front end).

L{RecordingHandler} records every call in order, answers from a script (or
with friendly defaults), and can leave chosen calls pending so that a test
fires their Deferreds by hand (L{RecordingHandler.pending}).  The message
bytes it receives accumulate in L{RecordingHandler.body}.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence, Union

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from smtprelay.protocol import replies
from smtprelay.interfaces import ClientSession, IRelayHandler, Params
from smtprelay.protocol.replies import Reply, reply

ScriptEntry = Union[Reply, Sequence[Reply]]

QUEUED = reply(250, "2.0.0", "Ok: queued")

_DEFAULTS: dict[str, ScriptEntry] = {
    "authenticate": replies.AUTH_OK,
    "mail": replies.MAIL_OK,
    "rcpt": replies.RCPT_OK,
    "data": replies.START_INPUT,
    "endData": QUEUED,
}


@implementer(IRelayHandler)
class RecordingHandler:
    """
    A fake relay handler.

    The script maps a method name (C{"authenticate"}, C{"mail"},
    C{"rcpt"}, C{"data"}, C{"endData"}) or C{"rcpt:ADDRESS"} to the reply
    to give.  C{endData} may map to a list (one reply per recipient, for
    LMTP); a single reply is repeated for each accepted recipient on an
    LMTP session.

    @ivar session: the L{ClientSession} served.
    @ivar calls: every call as C{(method, args)}, in order.
    @ivar pending: Deferreds of calls named in C{manual}, oldest first; the
        test fires them (L{fire} is a shortcut).
    @ivar body: every byte passed to C{dataChunk} in this transaction.
    @ivar chunks: the C{dataChunk} arguments, in order.
    @ivar producer: the producer passed to C{data}, or None.
    @ivar aborted: the reply passed to C{abortData}, or None.
    @ivar closed: how many times C{close} was called (should be 0 or 1).
    @ivar accepted: recipients this handler accepted in this transaction.
    """

    def __init__(
        self,
        session: ClientSession,
        script: Mapping[str, ScriptEntry] | None = None,
        manual: Collection[str] = (),
    ) -> None:
        """
        @param session: the session to serve.
        @param script: replies by method name, overriding the defaults.
        @param manual: method names whose Deferreds stay pending until the
            test fires them.
        """
        self.session = session
        self.script: dict[str, ScriptEntry] = dict(_DEFAULTS)
        self.script.update(script or {})
        self.manual = set(manual)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.pending: list[Deferred[Any]] = []
        self.body = b""
        self.chunks: list[bytes] = []
        self.producer: IPushProducer | None = None
        self.aborted: Reply | None = None
        self.closed = 0
        self.accepted: list[bytes] = []
        self._pendingDefaults: list[Any] = []

    @property
    def methods(self) -> list[str]:
        """
        The names of the methods called so far, in order.
        """
        return [name for name, _ in self.calls]

    def fire(self, result: Any = None) -> None:
        """
        Fire the oldest pending Deferred with C{result} (or its scripted
        reply when C{result} is None).
        """
        d, default = self.pending.pop(0), self._pendingDefaults.pop(0)
        d.callback(default if result is None else result)

    def pause(self) -> None:
        """
        Pause the client's socket as a slow downstream would.
        """
        assert self.producer is not None
        self.producer.pauseProducing()

    def resume(self) -> None:
        """
        Resume the client's socket.
        """
        assert self.producer is not None
        self.producer.resumeProducing()

    def _answer(self, name: str, value: Any) -> Deferred[Any]:
        if name in self.manual:
            d: Deferred[Any] = Deferred()
            self.pending.append(d)
            self._pendingDefaults.append(value)
            return d
        return succeed(value)

    # -- IRelayHandler -------------------------------------------------------

    def authenticate(self, mechanism: str, username: str, password: str) -> Deferred[Reply]:
        self.calls.append(("authenticate", (mechanism, username, password)))
        entry = self.script.get("authenticate:" + username, self.script["authenticate"])
        assert isinstance(entry, Reply)
        return self._answer("authenticate", entry)

    def mail(self, sender: bytes, params: Params) -> Deferred[Reply]:
        self.calls.append(("mail", (sender, dict(params))))
        self.accepted = []
        self.body = b""
        self.chunks = []
        self.aborted = None
        entry = self.script["mail"]
        assert isinstance(entry, Reply)
        return self._answer("mail", entry)

    def rcpt(self, recipient: bytes, params: Params) -> Deferred[Reply]:
        self.calls.append(("rcpt", (recipient, dict(params))))
        key = "rcpt:" + recipient.decode("utf-8", "replace")
        entry = self.script.get(key, self.script["rcpt"])
        assert isinstance(entry, Reply)
        if entry.positive:
            self.accepted.append(recipient)
        return self._answer("rcpt", entry)

    def data(self, producer: IPushProducer) -> Deferred[Reply]:
        self.calls.append(("data", (producer,)))
        self.producer = producer
        entry = self.script["data"]
        assert isinstance(entry, Reply)
        return self._answer("data", entry)

    def dataChunk(self, chunk: bytes) -> None:
        self.calls.append(("dataChunk", (chunk,)))
        self.chunks.append(chunk)
        self.body += chunk

    def endData(self) -> Deferred[Sequence[Reply]]:
        self.calls.append(("endData", ()))
        entry = self.script["endData"]
        count = len(self.accepted) if self.session.protocol == "lmtp" else 1
        if isinstance(entry, Reply):
            result = [entry] * max(count, 1)
        else:
            result = list(entry)
        return self._answer("endData", result)

    def abortData(self, reply: Reply) -> None:
        self.calls.append(("abortData", (reply,)))
        self.aborted = reply

    def reset(self) -> None:
        self.calls.append(("reset", ()))
        self.accepted = []

    def close(self) -> None:
        self.calls.append(("close", ()))
        self.closed += 1


class RecordingHandlerFactory:
    """
    A handler factory for L{smtprelay.inbound.factory.SMTPServerFactory} that makes
    L{RecordingHandler}s and keeps them.

    @ivar handlers: every handler made, in order.
    """

    def __init__(
        self,
        script: Mapping[str, ScriptEntry] | None = None,
        manual: Collection[str] = (),
    ) -> None:
        self.script = script
        self.manual = manual
        self.handlers: list[RecordingHandler] = []

    def __call__(self, session: ClientSession) -> RecordingHandler:
        handler = RecordingHandler(session, self.script, self.manual)
        self.handlers.append(handler)
        return handler

    @property
    def last(self) -> RecordingHandler:
        """
        The most recently made handler.
        """
        return self.handlers[-1]
