"""
TLS at run time: client options that judge the peer after the handshake,
server options that can be swapped in place, the cipher's bits.

The options are built from the configuration where objects are wired
(L{smtprelay.app.tls}); here they only hold an OpenSSL context and make
connections from it.  Client options encrypt whatever the target's
certificate and judge it after the handshake: a chain to a trusted root and
the target's name (or C{server_name}) checked with service_identity, DNS-ID
or IP-ID, never a CN fallback.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from OpenSSL import SSL
from OpenSSL._util import ffi as _ffi, lib as _lib
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def setCurves(connection: SSL.Connection, curves: bytes) -> None:
    """
    Offer the key-exchange groups C{curves} (C{b"X25519:P-256"}) on C{connection}.

    @raise ValueError: an unknown curve name.
    """
    # pyOpenSSL has no API for the key-exchange group list; OpenSSL's is
    # SSL_set1_curves_list (an alias of SSL_set1_groups_list).
    if _lib.SSL_set1_curves_list(connection._ssl, curves) != 1:
        raise ValueError("tls_client: unknown curve in " + curves.decode("ascii", "replace"))


@implementer(IOpenSSLClientConnectionCreator)
class ClientOptions:
    """
    TLS client options for one downstream host.  They never fail a
    handshake over the peer's certificate: L{verify} judges it after the
    handshake.  So opportunistic TLS stays encrypted with a peer it cannot
    verify (Postfix's C{may} level), while C{require_tls} and credentials
    ask for a verified one.  Build them once per host and reuse them: they
    hold the OpenSSL context (L{smtprelay.app.tls.clientOptions} builds
    them from the configuration).

    @param context: a context that does not abort a handshake over the
        peer's certificate, with the trusted roots loaded unless
        C{skipVerify}.
    @param curves: the key-exchange groups to offer (C{b"X25519:P-256"}),
        or None for OpenSSL's default.

    @ivar serverName: the name verified (DNS-ID or IP-ID, never the CN)
        and sent as SNI (unless an IP literal).
    @ivar skipVerify: C{insecure_skip_verify}: the peer is never verified,
        and need not be.
    """

    def __init__(
        self, context: SSL.Context, serverName: str, skipVerify: bool = False, curves: bytes | None = None
    ) -> None:
        self._context = context
        self.serverName = serverName
        self.skipVerify = skipVerify
        self._isIP = _isIP(serverName)
        self._sni = None if self._isIP else serverName.encode("idna")
        self._curves = curves

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        if self._curves is not None:
            setCurves(connection, self._curves)
        connection.set_connect_state()
        return connection

    def verify(self, connection: SSL.Connection) -> str | None:
        """
        Judge the peer of C{connection} once its handshake is complete.

        @return: None when the peer is verified (its chain leads to a
            trusted root and its certificate names L{serverName}), else a
            log-safe reason why not.
        """
        if self.skipVerify:
            return "insecure_skip_verify"
        if connection.get_peer_certificate() is None:
            return "no peer certificate"
        result = _lib.SSL_get_verify_result(connection._ssl)
        if result != 0:  # X509_V_OK
            return _ffi.string(_lib.X509_verify_cert_error_string(result)).decode("ascii", "replace")
        try:
            if self._isIP:
                verify_ip_address(connection, self.serverName)
            else:
                verify_hostname(connection, self.serverName)
        except (VerificationError, CertificateError):
            return f"certificate does not name {self.serverName}"
        return None


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    Server TLS options that can be loaded again (SIGHUP).  New handshakes
    use the new context; established sessions are untouched.

    @param load: makes the options (L{smtprelay.app.tls.serverOptions}
        reads the certificate chain and key with it); called now and at
        every L{reload}.
    """

    def __init__(self, load: Callable[[], ssl.CertificateOptions]) -> None:
        self._load = load
        self._options = load()

    def reload(self) -> None:
        """
        Load the options again.  On error the old ones stay in use and the
        error is raised for the caller to log.
        """
        self._options = self._load()

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection
