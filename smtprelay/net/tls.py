"""
TLS options from configuration (the C{tls} and C{tls_client} directives).

Client options encrypt whatever the target's certificate, and judge it
after the handshake: a chain to a trusted root and the target's name (or
C{server_name}) checked with service_identity, DNS-ID or IP-ID, never a CN
fallback.  Server options load a certificate chain and key from PEM
files and can be reloaded in place (SIGHUP) without touching sessions.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from OpenSSL import SSL, crypto
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

from smtprelay.config.model import ClientTLS, ServerTLS

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
_VERSIONS = {
    "tls1.0": ssl.TLSVersion.TLSv1_0,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}


def _read(path: str) -> bytes:
    """
    @raise ValueError: C{PATH: cannot read: REASON}.
    """
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None


def _certificates(path: str) -> list[ssl.Certificate]:
    """
    The PEM certificates in C{path}, at least one.

    @raise ValueError: C{PATH: reason}.
    """
    pems = _PEM_CERT.findall(_read(path))
    if not pems:
        raise ValueError(f"{path}: no PEM certificate found")
    try:
        return [ssl.Certificate.loadPEM(pem) for pem in pems]
    except crypto.Error:
        raise ValueError(f"{path}: not a valid PEM certificate") from None


def _privateCertificate(certPath: str, keyPath: str) -> tuple[list[ssl.Certificate], ssl.KeyPair]:
    """
    The certificate chain in C{certPath} and the private key in
    C{keyPath}, which must belong to its first certificate.

    @raise ValueError: C{PATH: reason}.
    """
    chain = _certificates(certPath)
    try:
        # An empty passphrase: an encrypted key fails here instead of
        # prompting on the terminal.
        key = ssl.KeyPair(crypto.load_privatekey(crypto.FILETYPE_PEM, _read(keyPath), b""))
    except crypto.Error:
        raise ValueError(f"{keyPath}: not an unencrypted PEM private key") from None
    if not key.matches(chain[0].getPublicKey()):
        raise ValueError(f"{keyPath}: does not match the certificate in {certPath}")
    return chain, key


def _versionOptions(protocols: tuple[str, str | None]) -> dict[str, Any]:
    low, high = protocols
    minimum = _VERSIONS[low]
    options: dict[str, Any] = {}
    # Twisted only raises its default minimum (TLS 1.2) with raiseMinimumTo.
    if minimum < ssl.TLSVersion.TLSv1_2:
        options["insecurelyLowerMinimumTo"] = minimum
    else:
        options["raiseMinimumTo"] = minimum
    if high is not None:
        options["lowerMaximumSecurityTo"] = _VERSIONS[high]
    return options


def _cipherOptions(ciphers: str | None) -> dict[str, Any]:
    if not ciphers:
        return {}
    return {"acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers)}


def _isIP(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _setCurves(connection: SSL.Connection, curves: bytes) -> None:
    # pyOpenSSL has no API for the key-exchange group list; OpenSSL's is
    # SSL_set1_curves_list (an alias of SSL_set1_groups_list).
    if _lib.SSL_set1_curves_list(connection._ssl, curves) != 1:  # type: ignore[attr-defined]
        raise ValueError("tls_client: unknown curve in " + curves.decode("ascii", "replace"))


@implementer(IOpenSSLClientConnectionCreator)
class ClientOptions:
    """
    TLS client options for one downstream host.  They never fail a
    handshake over the peer's certificate: L{verify} judges it after the
    handshake.  So opportunistic TLS stays encrypted with a peer it cannot
    verify (Postfix's C{may} level), while C{require_tls} and credentials
    ask for a verified one.  Build them once per host and reuse them: they
    hold the OpenSSL context.

    @param hostname: the host connected to (a name or IP literal).
    @raise ValueError: an unknown curve name; a file that cannot be read
        or does not hold what it should (C{PATH: reason}).

    @ivar serverName: the name verified (DNS-ID or IP-ID, never the CN)
        and sent as SNI (unless an IP literal).
    @ivar skipVerify: C{insecure_skip_verify}: the peer is never verified,
        and need not be.
    """

    def __init__(self, tls: ClientTLS, hostname: str) -> None:
        extra: dict[str, Any] = {**_versionOptions(tls.protocols), **_cipherOptions(tls.ciphers)}
        if tls.cert and tls.key:
            chain, key = _privateCertificate(tls.cert, tls.key)
            extra.update(privateKey=key.original, certificate=chain[0].original)
        # VERIFY_NONE: OpenSSL still checks the chain against the roots
        # loaded below and keeps the result for verify(); it just does not
        # abort the handshake over it.
        self._context = ssl.CertificateOptions(verify=False, **extra).getContext()
        self.skipVerify = tls.insecureSkipVerify
        if not self.skipVerify:
            trustRoot: Any = ssl.platformTrust()
            if tls.rootCAs:
                trustRoot = ssl.trustRootFromCertificates(
                    [cert for path in tls.rootCAs for cert in _certificates(path)]
                )
            trustRoot._addCACertsToContext(self._context)
        self.serverName = tls.serverName or hostname
        self._isIP = _isIP(self.serverName)
        self._sni = None if self._isIP else self.serverName.encode("idna")
        self._curves = ":".join(tls.curves).encode("ascii") if tls.curves else None
        if self._curves is not None:
            _setCurves(SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None), self._curves)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if self._sni is not None:
            connection.set_tlsext_host_name(self._sni)
        if self._curves is not None:
            _setCurves(connection, self._curves)
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
        result = _lib.SSL_get_verify_result(connection._ssl)  # type: ignore[attr-defined]
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


def cipherBits(connection: SSL.Connection) -> tuple[int, int]:
    """
    The secret bits and the algorithm bits of C{connection}'s cipher, as
    Postfix logs them (C{256/256 bits}).
    """
    cipher = _lib.SSL_get_current_cipher(connection._ssl)  # type: ignore[attr-defined]
    if cipher == _ffi.NULL:
        return (0, 0)
    algorithm = _ffi.new("int *")
    used = _lib.SSL_CIPHER_get_bits(cipher, algorithm)
    return (int(used), int(algorithm[0]))


@implementer(IOpenSSLContextFactory, IOpenSSLServerConnectionCreator)
class ReloadableServerOptions:
    """
    Server TLS options that can re-read their files (SIGHUP).  New
    handshakes use the new certificate; established sessions are untouched.

    @ivar config: the C{tls} settings the files come from.
    """

    def __init__(self, config: ServerTLS) -> None:
        self.config = config
        self._options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        config = self.config
        chain, key = _privateCertificate(config.cert, config.key)
        extra: dict[str, Any] = {
            **_versionOptions(config.protocols),
            **_cipherOptions(config.ciphers),
        }
        if config.clientCA:
            extra.update(
                verify=True,
                caCerts=[c.original for c in _certificates(config.clientCA)],
                requireCertificate=False,
            )
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=chain[0].original,
            extraCertChain=[c.original for c in chain[1:]],
            # A client that comes back resumes its session from a ticket
            # (an abbreviated handshake), as with Postfix's smtpd.
            enableSessionTickets=True,
            **extra,
        )
        options.getContext()  # the context's errors come now, not in a handshake
        return options

    def reload(self) -> None:
        """
        Re-read the certificate chain and key.  On error the old ones stay
        in use and the error is raised for the caller to log.
        """
        self._options = self._load()

    def getContext(self) -> SSL.Context:
        return self._options.getContext()

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection


def serverOptions(tls: ServerTLS) -> ReloadableServerOptions:
    """
    Server TLS options for STARTTLS and C{tls://} listeners.

    @raise ValueError: a file that cannot be read or does not hold what it
        should (C{PATH: reason}): no PEM certificate, no unencrypted PEM
        key, a key that does not match the certificate.
    """
    return ReloadableServerOptions(tls)
