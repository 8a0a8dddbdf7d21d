"""
TLS options from configuration (SPEC §2.4, §2.5).

Client options verify the target's name (or C{server_name}) with
service_identity through C{optionsForClientTLS}: DNS-ID or IP-ID, never a
CN fallback.  Server options load a certificate chain and key from PEM
files and can be reloaded in place (SIGHUP) without touching sessions.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from zope.interface import implementer

from .config.model import ClientTLS, ServerTLS

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
class _WithCurves:
    """
    Restrict the key-exchange groups of every connection made by C{inner}.
    """

    def __init__(self, inner: IOpenSSLClientConnectionCreator, curves: bytes) -> None:
        self._inner = inner
        self._curves = curves

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = self._inner.clientConnectionForTLS(tlsProtocol)
        _setCurves(connection, self._curves)
        return connection


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    Encrypt without verifying the peer (C{insecure_skip_verify}), still
    sending SNI for a host name.
    """

    def __init__(self, options: ssl.CertificateOptions, serverName: str) -> None:
        self._options = options
        self._serverName = None if _isIP(serverName) else serverName.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        if self._serverName:
            connection.set_tlsext_host_name(self._serverName)
        connection.set_connect_state()
        return connection


def clientOptions(tls: ClientTLS, hostname: str) -> IOpenSSLClientConnectionCreator:
    """
    Options for connecting to C{hostname} (a name or IP literal) as a TLS
    client.  The peer's name (C{server_name}, else C{hostname}) is verified
    with service_identity (DNS-ID or IP-ID) and sent as SNI; C{root_ca}
    replaces the system roots; C{cert}+C{key} give a client certificate;
    C{insecure_skip_verify} encrypts without verifying.  Build it once per
    host and reuse it: it holds the OpenSSL context.

    @raise ValueError: an unknown curve name; a file that cannot be read
        or does not hold what it should (C{PATH: reason}).
    """
    extra: dict[str, Any] = {**_versionOptions(tls.protocols), **_cipherOptions(tls.ciphers)}
    name = tls.serverName or hostname
    clientCertificate = None
    if tls.cert and tls.key:
        chain, key = _privateCertificate(tls.cert, tls.key)
        clientCertificate = ssl.PrivateCertificate.fromCertificateAndKeyPair(chain[0], key)
    creator: IOpenSSLClientConnectionCreator
    if tls.insecureSkipVerify:
        if clientCertificate is not None:
            extra.update(
                privateKey=clientCertificate.privateKey.original,
                certificate=clientCertificate.original,
            )
        creator = _Unverified(ssl.CertificateOptions(verify=False, **extra), name)
    else:
        trustRoot: Any = ssl.platformTrust()
        if tls.rootCAs:
            trustRoot = ssl.trustRootFromCertificates(
                [cert for path in tls.rootCAs for cert in _certificates(path)]
            )
        creator = ssl.optionsForClientTLS(
            name,
            trustRoot=trustRoot,
            clientCertificate=clientCertificate,
            extraCertificateOptions=extra,
        )
    if tls.curves:
        curves = ":".join(tls.curves).encode("ascii")
        probe = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        _setCurves(probe, curves)
        creator = _WithCurves(creator, curves)
    return creator


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
