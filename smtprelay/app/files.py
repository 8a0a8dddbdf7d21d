"""
The files a configuration names, read as the relay will read them.

Certificates, private keys, CA bundles and C{auth users} files are loaded
when the relay starts, not when the configuration is parsed.
L{fileErrors} loads each of them once with the relay's own loaders, so that
C{twistd} and C{smtprelay-check} report a missing, unreadable or invalid
file as one C{FILE:LINE: directive: PATH: reason} line instead of a
traceback.  (C{file:} passwords are read by the parser itself.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

from smtprelay.config.model import Config
from smtprelay.app.tls import clientOptions, serverOptions

_T = TypeVar("_T")


def _once(settings: Iterable[_T | None]) -> list[_T]:
    """
    Each setting once (a global C{tls} serves many listeners), in order.
    """
    return list({id(s): s for s in settings if s is not None}.values())


def fileErrors(config: Config) -> list[str]:
    """
    Load every certificate, key, CA and users file C{config} names.

    @return: one line per problem, such as C{relay.conf:3: tls: /etc/x.pem:
        cannot read: No such file or directory}; empty when all load.
    """
    errors: list[str] = []

    def load(origin: str, directive: str, loader: Callable[..., object], *args: object) -> None:
        try:
            loader(*args)
        except ValueError as e:
            errors.append(f"{origin}: {directive}: {e}" if origin else f"{directive}: {e}")

    for server in _once([config.tls, *(listener.tls for listener in config.listeners)]):
        load(server.origin, "tls", serverOptions, server)
    targets = [*config.targets, *(t for listener in config.listeners for t in listener.targets)]
    for client in _once([config.tlsClient, *(target.tlsClient for target in targets)]):
        # The name only matters when verifying a peer; any name loads the files.
        load(client.origin, "tls_client", clientOptions, client, "localhost")
    for auth in _once(listener.auth for listener in config.listeners):
        if auth.mode == "users" and auth.usersFile:
            from smtprelay.inbound.users import UsersFile  # bcrypt only where a users file is configured

            load(auth.origin, "auth", UsersFile, auth.usersFile)
    return errors
