"""
The PROXY protocol (v1 text and v2 binary) read before the SMTP greeting.

L{ProxyProtocolFactory} wraps a server factory.  A connection whose real
source lies in the C{trusted} networks must start with a PROXY header: only
once the header is read is the wrapped protocol built and connected (so its
C{connectionMade}, which sends the greeting, comes after the header), and
its transport's C{getPeer} returns the client the header names.  A missing,
slow, malformed or oversized header closes the connection without a byte.
Connections from other sources are never wrapped: they are the wrapped
factory's own, and a PROXY line they send is just an unknown SMTP command
(or, with C{untrusted="drop"}, they are closed at once).

Twisted's C{haproxy:} endpoint is not used: it connects the wrapped protocol
before the header (the greeting goes out too early, twisted#12501), trusts
any source, and its parsers need the first 8 or 16 bytes in one segment.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Literal, Union

import attrs
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from smtprelay.net.address import IPNetwork

IPAddress = Union[IPv4Address, IPv6Address]

V1_MAX = 107
"""The longest v1 header, CRLF included (the protocol's own limit)."""

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
"""The 12 bytes that start every v2 header."""

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
_V2_LOCAL, _V2_PROXY = 0x20, 0x21
_V2_UNSPEC, _V2_TCP4, _V2_TCP6 = 0x00, 0x11, 0x21


class InvalidProxyHeader(Exception):
    """
    The bytes are not a PROXY header this relay accepts.
    """


@attrs.frozen
class ProxyHeader:
    """
    What a PROXY header said.

    @ivar version: 1 or 2.
    @ivar source: the client's address, or None for C{PROXY UNKNOWN}, a v2
        C{LOCAL} command or an C{AF_UNSPEC} family (health checks: the real
        peer stays).
    @ivar destination: the address the client connected to, or None.
    """

    version: int
    source: IPAddress | None = None
    destination: IPAddress | None = None


def parseV1(line: bytes) -> ProxyHeader:
    """
    Parse a v1 header line without its CRLF.

    @raise InvalidProxyHeader: for anything but C{PROXY UNKNOWN[ …]} or
        C{PROXY TCP4|TCP6 SRC DST SPORT DPORT} with addresses of the named
        family and ports 0–65535.
    """
    if not line.startswith(_V1_PREFIX) or b"\r" in line or b"\n" in line:
        raise InvalidProxyHeader("not a PROXY v1 line")
    fields = line.split(b" ")
    if fields[1] == b"UNKNOWN":
        # The protocol lets the sender put anything after UNKNOWN.
        return ProxyHeader(1)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise InvalidProxyHeader("bad PROXY v1 fields")
    family: type[IPAddress] = IPv4Address if fields[1] == b"TCP4" else IPv6Address
    version = 4 if family is IPv4Address else 6
    source = _textAddress(fields[2], fields[4], version, family)
    destination = _textAddress(fields[3], fields[5], version, family)
    return ProxyHeader(1, source, destination)


def _textAddress(host: bytes, port: bytes, version: int, family: type[IPAddress]) -> IPAddress:
    try:
        ip = ipaddress.ip_address(host.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader("bad address in PROXY v1 line") from None
    if b"%" in host:
        raise InvalidProxyHeader("scoped address in PROXY v1 line")
    if ip.version != version:
        raise InvalidProxyHeader("address family does not match PROXY v1 protocol")
    if not (1 <= len(port) <= 5 and port.isdigit() and int(port) <= 65535):
        raise InvalidProxyHeader("bad port in PROXY v1 line")
    return family("TCP", str(ip), int(port))


def parseV2(header: bytes) -> ProxyHeader:
    """
    Parse a complete v2 header (signature, fixed part and address block).

    TLVs after the addresses are skipped.

    @raise InvalidProxyHeader: for a bad signature, version or command, or
        a family other than C{AF_UNSPEC}, C{TCP over IPv4} and C{TCP over
        IPv6}: an SMTP relay proxies TCP streams only, and a UDP or unix
        source must not pass as the proxy's own address.
    """
    if len(header) < _V2_FIXED or not header.startswith(V2_SIGNATURE):
        raise InvalidProxyHeader("not a PROXY v2 header")
    command, family, length = struct.unpack("!BBH", header[12:_V2_FIXED])
    if len(header) != _V2_FIXED + length:
        raise InvalidProxyHeader("PROXY v2 length mismatch")
    if command == _V2_LOCAL:
        return ProxyHeader(2)
    if command != _V2_PROXY:
        raise InvalidProxyHeader("bad PROXY v2 version or command")
    block = header[_V2_FIXED:]
    if family == _V2_UNSPEC:
        return ProxyHeader(2)
    cls: type[IPv4Address | IPv6Address]
    if family == _V2_TCP4:
        size, cls = 4, IPv4Address
    elif family == _V2_TCP6:
        size, cls = 16, IPv6Address
    else:
        raise InvalidProxyHeader("unsupported PROXY v2 family")
    if len(block) < 2 * size + 4:
        raise InvalidProxyHeader("short PROXY v2 address block")
    source = ipaddress.ip_address(block[:size])
    destination = ipaddress.ip_address(block[size : 2 * size])
    sourcePort, destinationPort = struct.unpack("!HH", block[2 * size : 2 * size + 4])
    return ProxyHeader(
        2, cls("TCP", str(source), sourcePort), cls("TCP", str(destination), destinationPort)
    )


class HeaderReader:
    """
    Reads one PROXY header, v1 or v2, from a stream in segments of any size.
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """
        Add bytes.

        @return: None until the header is complete, then the header and the
            bytes that followed it.
        @raise InvalidProxyHeader: as soon as the bytes cannot start a valid
            header, or a v1 line exceeds L{V1_MAX} bytes.
        """
        buffer = self._buffer = self._buffer + data
        if buffer[:1] == b"\r":
            return self._feedV2(buffer)
        return self._feedV1(buffer)

    def _feedV1(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(_V1_PREFIX[: len(buffer)]):
            raise InvalidProxyHeader("not a PROXY header")
        end = buffer.find(b"\r\n", 0, V1_MAX)
        if end < 0:
            if len(buffer) >= V1_MAX:
                raise InvalidProxyHeader("PROXY v1 line too long")
            return None
        return parseV1(buffer[:end]), buffer[end + 2 :]

    def _feedV2(self, buffer: bytes) -> tuple[ProxyHeader, bytes] | None:
        if not buffer.startswith(V2_SIGNATURE[: len(buffer)]):
            raise InvalidProxyHeader("not a PROXY header")
        if len(buffer) > 12 and buffer[12] >> 4 != 2:
            raise InvalidProxyHeader("bad PROXY v2 version")
        if len(buffer) < _V2_FIXED:
            return None
        (length,) = struct.unpack("!H", buffer[14:_V2_FIXED])
        end = _V2_FIXED + length
        if len(buffer) < end:
            return None
        return parseV2(buffer[:end]), buffer[end:]


def _ipOf(address: IAddress) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@implementer(IProtocol, ITransport, IHandshakeListener)
class ProxyProtocol(Protocol):
    """
    One connection from a trusted source: reads the PROXY header, then
    builds and connects the wrapped protocol and becomes its transport.

    @ivar header: the parsed header, once read.
    @ivar wrappedProtocol: the wrapped protocol, once connected.
    """

    _log = Logger()

    def __init__(self, factory: ProxyProtocolFactory) -> None:
        self.factory = factory
        self.header: ProxyHeader | None = None
        self.wrappedProtocol: IProtocol | None = None
        self._reader: HeaderReader | None = HeaderReader()
        self._timer: IDelayedCall | None = None
        self._transport: Any = None
        self._early = b""
        self.disconnecting = False

    # -- the protocol side (the real transport talks to us) -------------------

    def makeConnection(self, transport: ITransport) -> None:
        # Whatever the real transport provides (TCP, TLS, producer…), so do we.
        directlyProvides(self, providedBy(transport))
        self._transport = transport
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        self._timer = self.factory.reactor.callLater(self.factory.timeout, self._timedOut)

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._reader is None:
            return  # closing after a bad header: ignore the rest
        try:
            result = self._reader.feed(data)
        except InvalidProxyHeader as e:
            self._refuse(str(e))
            return
        if result is not None:
            self.header, rest = result
            self._connectWrapped(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancelTimer()
        self._reader = None
        wrapped, self.wrappedProtocol = self.wrappedProtocol, None
        if wrapped is not None:
            wrapped.connectionLost(reason)

    def handshakeCompleted(self) -> None:
        """
        TLS started over this connection (STARTTLS): tell the wrapped
        protocol, as a TLS transport would.
        """
        wrapped = self.wrappedProtocol
        if IHandshakeListener.providedBy(wrapped):
            IHandshakeListener(wrapped).handshakeCompleted()

    def _connectWrapped(self, rest: bytes) -> None:
        self._cancelTimer()
        self._reader = None
        peer = self.getPeer()
        self._log.debug(
            "PROXY v{version} header from {proxy}: client {client}",
            version=self.header.version if self.header else 0,
            proxy=_describe(self._transport.getPeer()),
            client=_describe(peer),
        )
        wrapped = self.factory.wrappedFactory.buildProtocol(peer)
        if wrapped is None:
            self.loseConnection()
            return
        self.wrappedProtocol = wrapped
        self._early = rest
        wrapped.makeConnection(self)
        self._early = b""
        if rest and self.wrappedProtocol is not None and not self.disconnecting:
            self.wrappedProtocol.dataReceived(rest)

    def _timedOut(self) -> None:
        self._timer = None
        self._refuse("no PROXY header in time")

    def _refuse(self, reason: str) -> None:
        self._cancelTimer()
        self._reader = None
        self._log.info(
            "closed connection from {proxy}: {reason}",
            proxy=_describe(self._transport.getPeer()),
            reason=reason,
        )
        self.loseConnection()

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- the transport side (the wrapped protocol talks to us) ----------------

    def getPeer(self) -> IAddress:
        """
        The client the header named, or the real peer for C{UNKNOWN}/C{LOCAL}.
        """
        if self.header is not None and self.header.source is not None:
            return self.header.source
        return self._transport.getPeer()

    def getHost(self) -> IAddress:
        """
        The address the client connected to, as the header says.
        """
        if self.header is not None and self.header.destination is not None:
            return self.header.destination
        return self._transport.getHost()

    def hasPendingInput(self) -> bool:
        """
        Whether the client sent bytes after the header that the wrapped
        protocol has not been given yet: true only during its
        C{connectionMade}, for pregreet checks (the socket cannot tell, as
        those bytes were read with the header).
        """
        return bool(self._early)

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def writeSequence(self, data: Any) -> None:
        self._transport.writeSequence(data)

    def loseConnection(self) -> None:
        self.disconnecting = True
        self._transport.loseConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self._transport.unregisterProducer()

    def __getattr__(self, name: str) -> Any:
        # pauseProducing, startTLS, getHandle, abortConnection…: the real
        # transport's.  Only reached for names this class lacks.
        if name.startswith("__") or self.__dict__.get("_transport") is None:
            raise AttributeError(name)
        return getattr(self.__dict__["_transport"], name)


@implementer(IProtocolFactory)
class ProxyProtocolFactory:
    """
    Wrap C{wrappedFactory} so that connections from C{trusted} sources
    start with a PROXY header (see the module docstring).

    For an implicit-TLS listener the PROXY header comes before the TLS
    handshake: wrap the TLS factory, not the other way round.

    @ivar untrusted: C{"serve"} (default): a connection from a source
        outside C{trusted} is the wrapped factory's own, untouched (greeting
        at once, a PROXY line is an SMTP command like any other);
        C{"drop"}: close it at once (a listener that only the proxy uses).
    """

    def __init__(
        self,
        wrappedFactory: IProtocolFactory,
        trusted: tuple[IPNetwork, ...],
        reactor: IReactorTime,
        timeout: float = 5.0,
        untrusted: Literal["serve", "drop"] = "serve",
    ) -> None:
        """
        @param wrappedFactory: the factory of the real protocol.
        @param trusted: the networks whose connections must send a header.
        @param reactor: the clock for the header timeout.
        @param timeout: seconds to wait for a complete header.
        @param untrusted: what to do with other sources (see above).
        """
        self.wrappedFactory = wrappedFactory
        self.trusted = trusted
        self.reactor = reactor
        self.timeout = timeout
        self.untrusted = untrusted
        self.numPorts = 0

    def isTrusted(self, address: IAddress) -> bool:
        """
        Whether C{address} (a real peer) may send a PROXY header.  Unix
        socket peers never may; IPv4-mapped IPv6 addresses count as IPv4.
        """
        ip = _ipOf(address)
        return ip is not None and any(
            ip.version == network.version and ip in network for network in self.trusted
        )

    def buildProtocol(self, addr: IAddress) -> IProtocol | None:
        """
        A L{ProxyProtocol} for a trusted source, else the wrapped factory's
        own protocol (or None to drop it).
        """
        if self.isTrusted(addr):
            return ProxyProtocol(self)
        if self.untrusted == "drop":
            return None
        return self.wrappedFactory.buildProtocol(addr)

    def doStart(self) -> None:
        self.numPorts += 1
        self.wrappedFactory.doStart()

    def doStop(self) -> None:
        self.numPorts -= 1
        self.wrappedFactory.doStop()

    def logPrefix(self) -> str:
        wrapped = self.wrappedFactory
        prefix = wrapped.logPrefix() if hasattr(wrapped, "logPrefix") else type(wrapped).__name__
        return f"{prefix} (PROXY)"


def _describe(address: IAddress) -> str:
    host = getattr(address, "host", None)
    if isinstance(host, str):
        return f"[{host}]:{getattr(address, 'port', 0)}"
    return "unix"
