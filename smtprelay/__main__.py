"""
C{python -m smtprelay check [--show] [--no-files] [CONFIG]}: the same as C{smtprelay-check}.
The relay itself runs under twistd (C{twistd -n smtprelay}).
"""

from __future__ import annotations

import sys

from smtprelay.app.check import main as check

USAGE = "usage: python -m smtprelay check [--show] [--no-files] [CONFIG]"


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        return check(argv[1:], prog="python -m smtprelay check")
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
