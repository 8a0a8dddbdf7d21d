"""
ADDRESS: where to connect or listen (C{tcp://}, C{tls://}, C{unix://}), and
networks of client addresses: plain values.

The configuration names addresses with it and the network edge connects to
them; it imports no Twisted, so that the configuration's values stay free
of the reactor.
"""

from __future__ import annotations

import ipaddress
from typing import Literal, Union

import attrs

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
