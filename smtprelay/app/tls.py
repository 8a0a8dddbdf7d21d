"""
TLS options from configuration (the C{tls} and C{tls_client} directives).

Reads the PEM files a directive names and builds the run-time options of
L{smtprelay.net.tls}: client options for one downstream host, server
options that read their files again on reload (SIGHUP).
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet import ssl

from smtprelay.config.model import ClientTLS, ServerTLS
from smtprelay.net.tls import ClientOptions, ReloadableServerOptions, setCurves
from smtprelay.reading import readBytes

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL
)
_VERSIONS = {
    "tls1.0": ssl.TLSVersion.TLSv1_0,
    "tls1.1": ssl.TLSVersion.TLSv1_1,
    "tls1.2": ssl.TLSVersion.TLSv1_2,
    "tls1.3": ssl.TLSVersion.TLSv1_3,
}


def _certificates(path: str) -> list[ssl.Certificate]:
    """
    The PEM certificates in C{path}, at least one.

    @raise ValueError: C{PATH: reason}.
    """
    pems = _PEM_CERT.findall(readBytes(path))
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
        key = ssl.KeyPair(crypto.load_privatekey(crypto.FILETYPE_PEM, readBytes(keyPath), b""))
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


def clientOptions(tls: ClientTLS, hostname: str) -> ClientOptions:
    """
    TLS client options for one downstream host: build them once per host
    and reuse them (they hold the OpenSSL context).

    @param hostname: the host connected to (a name or IP literal); the
        name verified unless C{tls} has a C{server_name}.
    @raise ValueError: an unknown curve name; a file that cannot be read
        or does not hold what it should (C{PATH: reason}).
    """
    extra: dict[str, Any] = {**_versionOptions(tls.protocols), **_cipherOptions(tls.ciphers)}
    if tls.cert and tls.key:
        chain, key = _privateCertificate(tls.cert, tls.key)
        extra.update(privateKey=key.original, certificate=chain[0].original)
    # VERIFY_NONE: OpenSSL still checks the chain against the roots loaded
    # below and keeps the result for ClientOptions.verify; it just does not
    # abort the handshake over it.
    context = ssl.CertificateOptions(verify=False, **extra).getContext()
    if not tls.insecureSkipVerify:
        trustRoot: Any = ssl.platformTrust()
        if tls.rootCAs:
            trustRoot = ssl.trustRootFromCertificates(
                [cert for path in tls.rootCAs for cert in _certificates(path)]
            )
        trustRoot._addCACertsToContext(context)
    curves = ":".join(tls.curves).encode("ascii") if tls.curves else None
    if curves is not None:
        # An unknown name fails now, at configuration time, not in a handshake.
        setCurves(SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None), curves)
    return ClientOptions(context, tls.serverName or hostname, tls.insecureSkipVerify, curves)


def serverOptions(tls: ServerTLS) -> ReloadableServerOptions:
    """
    Server TLS options for STARTTLS and C{tls://} listeners, which read
    C{tls}'s files again when reloaded.

    @raise ValueError: a file that cannot be read or does not hold what it
        should (C{PATH: reason}): no PEM certificate, no unencrypted PEM
        key, a key that does not match the certificate.
    """

    def load() -> ssl.CertificateOptions:
        chain, key = _privateCertificate(tls.cert, tls.key)
        extra: dict[str, Any] = {**_versionOptions(tls.protocols), **_cipherOptions(tls.ciphers)}
        if tls.clientCA:
            extra.update(
                verify=True,
                caCerts=[c.original for c in _certificates(tls.clientCA)],
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

    return ReloadableServerOptions(load)
