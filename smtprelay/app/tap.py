"""
The twistd plugin's options and service maker (C{twistd smtprelay ...}).

The option spellings are a public contract: C{--config}, repeatable
C{--listen} and C{--target}, C{--lmtp}, C{--hostname}, C{--check}.
Configuration errors are printed one per line and the process exits with
status 2 (not twistd's whole usage text).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import attrs
from twisted.python import usage

from smtprelay import config as configuration
from smtprelay.config.model import LOOPBACK, Config, Listener, Target
from smtprelay.net.address import Address
from smtprelay.app import service
from smtprelay.app.files import fileErrors

DEFAULT_CONFIG = "/etc/smtprelay/relay.conf"
QUICK_START_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
"""The command-line relay serves trusted loopback clients: room for 50 MB messages."""


class Options(usage.Options):
    synopsis = "[--config PATH | --listen ADDRESS... --target ADDRESS...] [--lmtp] [--check]"
    longdesc = ""
    """
    Empty: C{usage.Options} wraps C{longdesc} into one paragraph, which
    would run the examples together; L{getUsage} appends L{description}.
    """
    description = """\
A transparent, queue-less SMTP & LMTP forwarding relay.  Every transaction is
forwarded, while the client waits, to the first reachable target; the client
sees the target's own replies.

Examples:
  twistd -n smtprelay --config /etc/smtprelay/relay.conf
  twistd -n smtprelay --check --config relay.conf
  twistd -n smtprelay --listen tcp://127.0.0.1:2525 --target tcp://mx.example.net:25
  twistd -n smtprelay --listen unix:///run/smtprelay/lmtp.sock \\
         --target unix:///run/dovecot/lmtp --lmtp

Without --config, clients on loopback only may relay through --listen to the
--target addresses (tried in order), messages up to 64M.  ADDRESS is
tcp://HOST:PORT, tls://HOST:PORT (implicit TLS) or unix:///PATH.
"""

    optFlags = [
        ["lmtp", None, "The --target addresses speak LMTP."],
        ["check", None, "Validate the configuration and exit."],
    ]
    optParameters = [
        ["config", "c", None, f"Configuration file (default {DEFAULT_CONFIG})."],
        ["hostname", None, None, "Our name in greetings and Received: (default: FQDN)."],
        ["metrics", None, None, "Serve Prometheus /metrics on ADDRESS (e.g. tcp://127.0.0.1:9749)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["target"] = []

    def getUsage(self, width: int | None = None) -> str:
        """
        The option table, then L{description} line for line.
        """
        return f"{super().getUsage(width)}\n{self.description}"

    def opt_listen(self, address: str) -> None:
        """
        Listen on ADDRESS (repeatable).
        """
        self["listen"].append(_address(address))

    def opt_target(self, address: str) -> None:
        """
        Forward to ADDRESS; several are tried in order (repeatable).
        """
        self["target"].append(_address(address))

    def opt_metrics(self, address: str) -> None:
        """
        Serve Prometheus /metrics on ADDRESS (tcp:// or unix://).
        """
        self["metrics"] = _address(address)

    def postOptions(self) -> None:
        if self["config"] and (self["listen"] or self["target"]):
            raise usage.UsageError("use either --config or --listen/--target, not both")
        if bool(self["listen"]) != bool(self["target"]):
            raise usage.UsageError("--listen and --target go together")


def _address(text: str) -> Address:
    try:
        return configuration.parseAddress(text)
    except ValueError as e:
        raise usage.UsageError(f"{text}: {e}")


def configFromOptions(options: Options) -> Config:
    """
    The configuration the options describe: the file, or a quick-start
    relay from C{--listen} to C{--target}.

    @raise configuration.ConfigError: the file is invalid.
    """
    if not options["listen"]:
        loaded = configuration.load(options["config"] or DEFAULT_CONFIG)
        if options["hostname"]:
            loaded = attrs.evolve(loaded, hostname=options["hostname"])
        if options["metrics"]:
            loaded = attrs.evolve(loaded, metrics=options["metrics"])
        return loaded
    hostname = options["hostname"] or configuration.defaultHostname()
    lmtp = bool(options["lmtp"])
    target = Target(
        name="command-line",
        protocol="lmtp" if lmtp else "smtp",
        endpoints=tuple(options["target"]),
        hostname=hostname,
        attemptStartTLS=not lmtp,
    )
    listener = Listener(
        kind="smtp",
        addresses=tuple(options["listen"]),
        deliverTo=target,
        allow=LOOPBACK,
        maxMessageSize=QUICK_START_MAX_MESSAGE_SIZE,
    )
    return Config(hostname=hostname, listeners=(listener,), targets=(target,), metrics=options["metrics"])


def _fail(errors: list[str]) -> NoReturn:
    for line in errors:
        print(line, file=sys.stderr)
    raise SystemExit(2)


def makeService(options: Options, reactor: Any = None) -> service.RelayService:
    """
    What twistd (and C{relay.tac}) calls: load, check the configuration and
    the files it names, build.  Errors end the process with one line per
    problem and status 2.
    """
    try:
        loaded = configFromOptions(options)
    except configuration.ConfigError as e:
        _fail(e.errors)
    for warning in configuration.secretFileWarnings(loaded.source):
        print(warning, file=sys.stderr)
    errors = fileErrors(loaded)
    if errors:
        _fail(errors)
    if options["check"]:
        print(f"{loaded.source}: OK")
        raise SystemExit(0)
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    return service.makeService(loaded, reactor)
