"""
ADDRESS: where to connect or listen (C{tcp://}, C{tls://}, C{unix://}),
parsed by L{parseAddress} and written back by C{str()}; and networks of
client addresses.  Plain values and functions.

The configuration names addresses with it and the network edge connects to
them; it imports no Twisted, so that the configuration's values stay free
of the reactor.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Literal, Union

import attrs

_HOST = re.compile(r"[A-Za-z0-9_.\-\u0080-\U0010ffff]+")

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
"""A network of client addresses (C{trusted_proxies}, C{mynetworks})."""


@attrs.frozen
class Address:
    """
    An endpoint address: C{tcp://host:port}, C{tls://host:port} (implicit
    TLS) or C{unix:///path}.

    @ivar host: a host name or IP literal without brackets (empty for unix).
    @ivar path: the socket path (empty for tcp/tls).
    """

    scheme: Literal["tcp", "tls", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parseAddress(text: str) -> Address:
    """
    An endpoint address: C{tcp://HOST:PORT}, C{tls://HOST:PORT},
    C{unix:///abs/path}, or the short forms C{tcp:HOST:PORT},
    C{tls:HOST:PORT}, C{unix:/abs} and C{unix:relative}.  IPv6 literals go
    in brackets (C{tcp://[::1]:25}); the port is mandatory.

    @raise ValueError: with a message saying what is wrong.
    """
    scheme, colon, rest = text.partition(":")
    if not colon or not scheme or rest.isdigit():
        raise ValueError(f'"{text}": missing scheme (use tcp://, tls:// or unix://)')
    scheme = scheme.lower()
    if scheme == "unix":
        if rest.startswith("//"):
            if not rest.startswith("///"):
                raise ValueError(f'"{text}": use unix:///absolute/path or unix:relative/path')
            rest = rest[2:]
        if not rest:
            raise ValueError(f'"{text}": missing socket path')
        return Address("unix", path=rest)
    if scheme not in ("tcp", "tls"):
        raise ValueError(f'"{text}": unsupported scheme "{scheme}" (use tcp://, tls:// or unix://)')
    rest = rest.removeprefix("//")
    if rest.startswith("["):
        host, bracket, tail = rest[1:].partition("]")
        if not bracket:
            raise ValueError(f'"{text}": missing ] after the IPv6 address')
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f'"{text}": "{host}" is not an IPv6 address') from None
        if not tail.startswith(":"):
            raise ValueError(f'"{text}": missing port (as in {scheme}://[{host}]:25)')
        port = tail[1:]
    else:
        host, sep, port = rest.rpartition(":")
        if not sep:
            raise ValueError(f'"{text}": missing port (as in {scheme}://{rest}:25)')
        if ":" in host:
            raise ValueError(f'"{text}": put IPv6 addresses in brackets, as in [::1]:25')
        if not host:
            raise ValueError(f'"{text}": missing host')
        if not _HOST.fullmatch(host):
            raise ValueError(f'"{text}": "{host}" is not a host name or IP address')
    if not port.isdigit() or not port.isascii():
        raise ValueError(f'"{text}": "{port}" is not a port number')
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f'"{text}": port {number} is out of range (1-65535)')
    return Address(scheme, host=host, port=number)  # type: ignore[arg-type]  # scheme is one of the Literal's words, checked above
