"""
What a TLS connection negotiated, read in one place for both sides: the
inbound session (for its C{Received:} line, logs and metrics) and the
outbound client.  L{readTLSInfo} takes the transport a protocol sees, with
TLS started by C{startTLS} or by a wrapping C{TLSMemoryBIOProtocol}.
"""

from __future__ import annotations

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib

from smtprelay.interfaces import TLSInfo


def sslConnection(transport: object) -> SSL.Connection | None:
    """
    The OpenSSL connection of a TLS transport (implicit TLS wraps the
    transport; STARTTLS puts the TLS protocol inside it), or L{None}.
    """
    for candidate in (transport, getattr(transport, "protocol", None)):
        getHandle = getattr(candidate, "getHandle", None)
        connection = getHandle() if getHandle is not None else None
        if isinstance(connection, SSL.Connection):
            return connection
    return None


def cipherBits(connection: SSL.Connection) -> tuple[int, int]:
    """
    The secret bits and the algorithm bits of C{connection}'s cipher, as
    Postfix logs them (C{256/256 bits}).
    """
    cipher = _lib.SSL_get_current_cipher(connection._ssl)
    if cipher == _ffi.NULL:
        return (0, 0)
    algorithm = _ffi.new("int *")
    used = _lib.SSL_CIPHER_get_bits(cipher, algorithm)
    return (int(used), int(algorithm[0]))


def readTLSInfo(transport: object, verified: bool = False) -> TLSInfo:
    """
    The protocol version, cipher and cipher bits C{transport}'s TLS
    handshake negotiated.

    @param transport: a protocol's transport after C{handshakeCompleted}.
    @param verified: the caller's verdict on the peer's certificate.
    @return: the negotiated values, or C{unknown} ones (and no bits) when
        C{transport} has no OpenSSL connection.
    """
    connection = sslConnection(transport)
    if connection is None:
        return TLSInfo("unknown", "unknown")
    return TLSInfo(
        str(connection.get_protocol_version_name()),
        str(connection.get_cipher_name()),
        cipherBits(connection),
        verified=verified,
    )
