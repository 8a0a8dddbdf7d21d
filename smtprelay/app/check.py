"""
smtprelay-check: validate a configuration file (docs/configuration.md).

C{smtprelay-check [--show] [--no-files] [CONFIG]} prints C{CONFIG: OK}
(or, with C{--show}, the effective configuration with passwords masked) and
exits 0, or prints every error as C{FILE:LINE: message} on standard error
and exits 2.  The certificates, keys, CAs and users files the configuration
names are loaded as the relay loads them, unless C{--no-files} (to check a
configuration meant for another machine).  Warnings about secret files
readable by others go to standard error in both cases.
"""

from __future__ import annotations

import argparse
import sys

from smtprelay import config as configuration
from smtprelay.app.files import fileErrors

DEFAULT_CONFIG = "/etc/smtprelay/relay.conf"


def main(argv: list[str] | None = None, prog: str = "smtprelay-check") -> int:
    """
    Run the check on C{argv} (default C{sys.argv[1:]}).

    @return: the exit status: 0 valid, 2 invalid or bad usage.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Check an smtprelay configuration.")
    parser.add_argument("--show", action="store_true", help="print the effective configuration")
    parser.add_argument(
        "--no-files",
        action="store_true",
        help="do not read the certificate, key, CA and users files (file: passwords are read)",
    )
    parser.add_argument(
        "config", nargs="?", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}"
    )
    try:
        options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    try:
        loaded = configuration.load(options.config)
    except configuration.ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    for warning in configuration.secretFileWarnings(options.config):
        print(warning, file=sys.stderr)
    errors = [] if options.no_files else fileErrors(loaded)
    for line in errors:
        print(line, file=sys.stderr)
    if errors:
        return 2
    if options.show:
        sys.stdout.write(configuration.show(loaded))
    else:
        print(f"{options.config}: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
