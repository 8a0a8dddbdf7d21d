"""
Warnings about files that hold secrets but are readable by others,
as Postfix and OpenSSH give them.

A file holds secrets when it is a configuration file with a password written
in it (not taken from C{{env:...}}), a C{file:} password, a C{users} file or
a TLS private key.  Only warnings: an unreadable or invalid configuration is
reported by the loader, not here.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator

from .lexer import ConfigError, Node, fromEnvironment, readTree
from .targets import PASSWORD_MECHANISMS, passwordFile


def _secretFiles(nodes: Iterable[Node]) -> Iterator[str]:
    for node in nodes:
        args = node.args
        if node.name == "auth" and len(args) == 3 and args[0] in PASSWORD_MECHANISMS:
            path = passwordFile(args[2])
            if path is not None:
                yield path
            elif not fromEnvironment(node.rawArgs[2]):
                yield node.file
        elif node.name == "auth" and len(args) == 2 and args[0] == "users":
            yield args[1]  # the users file
        elif node.name == "tls" and len(args) == 2:
            yield args[1]  # the server's private key
        elif node.name == "key" and len(args) == 1:
            yield args[0]  # a tls_client private key
        yield from _secretFiles(node.children)


def secretFileWarnings(configPath: str) -> list[str]:
    """
    One warning per file holding secrets of the configuration at
    C{configPath} that its group or others may read.
    """
    try:
        nodes = readTree(configPath, os.environ)
    except ConfigError:
        return []
    warnings = []
    seen: set[str] = set()
    for path in _secretFiles(nodes):
        # Once per file, however many directives name it and however spelled.
        real = os.path.realpath(path)
        if real in seen:
            continue
        seen.add(real)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & stat.S_IROTH:
            who = "world-readable"
        elif mode & stat.S_IRGRP:
            who = "group-readable"
        else:
            continue
        warnings.append(f"warning: {path} holds secrets and is {who} ({mode:04o}); chmod 600 it")
    return warnings
