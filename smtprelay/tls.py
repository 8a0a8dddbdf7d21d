"""
TLS options from configuration (SPEC §2.4, §2.5).

Client options verify the target's name (or C{server_name}) with
service_identity through C{optionsForClientTLS}: DNS-ID or IP-ID, never a
CN fallback.  Server options load a certificate chain and key from PEM
files and can be reloaded in place (SIGHUP) without touching sessions.
"""

from __future__ import annotations

import re
from typing import Any

from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLContextFactory
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
    with open(path, "rb") as f:
        return f.read()


def _certificates(path: str) -> list[ssl.Certificate]:
    return [ssl.Certificate.loadPEM(pem) for pem in _PEM_CERT.findall(_read(path))]


def _versionOptions(protocols: tuple[str, str | None]) -> dict[str, Any]:
    low, high = protocols
    options: dict[str, Any] = {"raiseMinimumTo": _VERSIONS[low]}
    if high is not None:
        options["lowerMaximumSecurityTo"] = _VERSIONS[high]
    return options


def _cipherOptions(ciphers: str | None) -> dict[str, Any]:
    if not ciphers:
        return {}
    return {"acceptableCiphers": ssl.AcceptableCiphers.fromOpenSSLCipherString(ciphers)}


def clientOptions(tls: ClientTLS, hostname: str) -> Any:
    """
    Options for connecting to C{hostname} (a name or IP literal) as a TLS
    client: C{root_ca} replaces the system roots, C{cert}+C{key} give a
    client certificate, C{insecure_skip_verify} encrypts without verifying.
    """
    extra: dict[str, Any] = {**_versionOptions(tls.protocols), **_cipherOptions(tls.ciphers)}
    if tls.insecureSkipVerify:
        key = ssl.PrivateCertificate.loadPEM(_read(tls.cert) + b"\n" + _read(tls.key)) if tls.cert and tls.key else None
        if key is not None:
            extra.update(privateKey=key.privateKey.original, certificate=key.original)
        return ssl.CertificateOptions(verify=False, **extra)
    trustRoot: Any = ssl.platformTrust()
    if tls.rootCAs:
        trustRoot = ssl.trustRootFromCertificates(
            [cert for path in tls.rootCAs for cert in _certificates(path)]
        )
    clientCertificate = None
    if tls.cert and tls.key:
        clientCertificate = ssl.PrivateCertificate.loadPEM(_read(tls.cert) + b"\n" + _read(tls.key))
    return ssl.optionsForClientTLS(
        tls.serverName or hostname,
        trustRoot=trustRoot,
        clientCertificate=clientCertificate,
        extraCertificateOptions=extra,
    )


@implementer(IOpenSSLContextFactory)
class ReloadableServerOptions:
    """
    Server TLS options that can re-read their files (SIGHUP).  New
    handshakes use the new certificate; established sessions are untouched.
    """

    def __init__(self, config: ServerTLS) -> None:
        self.config = config
        self._options = self._load()

    def _load(self) -> ssl.CertificateOptions:
        config = self.config
        chain = _certificates(config.cert)
        if not chain:
            raise ValueError(f"{config.cert}: no PEM certificate found")
        key = ssl.KeyPair.load(_read(config.key), ssl.crypto.FILETYPE_PEM)
        extra: dict[str, Any] = {**_versionOptions(config.protocols), **_cipherOptions(config.ciphers)}
        if config.clientCA:
            extra.update(verify=True, caCerts=[c.original for c in _certificates(config.clientCA)],
                         requireCertificate=False)
        return ssl.CertificateOptions(
            privateKey=key.original,
            certificate=chain[0].original,
            extraCertChain=[c.original for c in chain[1:]],
            **extra,
        )

    def reload(self) -> None:
        """
        Re-read the certificate chain and key; on error keep the old ones.
        """
        self._options = self._load()

    def getContext(self) -> SSL.Context:
        return self._options.getContext()


def serverOptions(config: ServerTLS) -> ReloadableServerOptions:
    """
    Server TLS options for STARTTLS and C{tls://} listeners.
    """
    return ReloadableServerOptions(config)


__all__ = ["clientOptions", "serverOptions", "ReloadableServerOptions", "IOpenSSLClientConnectionCreator"]
