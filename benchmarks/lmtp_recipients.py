#!/usr/bin/env python3
"""
How long a real MTA takes to deliver one message with several recipients
through an SMTP listener whose target is LMTP, under each C{lmtp_split}
policy and client setting:

    sendmail -> Postfix (relayhost) --SMTP--> smtprelay --LMTP--> Dovecot

One message to alice, bob, carol and dave (and, in the C{*-quota} cases, to
C{full} instead of dave: a user over quota whose LMTP reply after the dot is
C{552 5.2.2}).  For each case it prints the seconds until every deliverable
recipient had the message (or the time limit), Postfix's delivery attempts
(queue runs of the message, and delivery attempts per recipient) and deferrals, and how many copies each user got.
Prints numbers and asserts nothing (it is not a test).

    PYTHONPATH=. .venv/bin/python benchmarks/lmtp_recipients.py            # short retry timers
    PYTHONPATH=. .venv/bin/python benchmarks/lmtp_recipients.py --postfix-defaults --cases one_rcpt

The short timers are those of C{tests/postfix-instance.sh} (C{queue_run_delay},
C{minimal_backoff_time} 5s, C{maximal_backoff_time} 30s); C{--postfix-defaults}
restores Postfix's (300s, 300s, 4000s), as a stock installation retries.
Runs as root (Postfix); every process is on 127.0.0.1 and is stopped at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.procs import Processes  # noqa: E402  (the same helpers as the real-peer tests)

USERS = ("alice", "bob", "carol", "dave")
MESSAGE = b"From: s@example.org\nSubject: four recipients\n\n" + b"x" * 2000 + b"\n"

CASES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    # name: (lmtp_split, Postfix main.cf lines, recipients)
    "one_rcpt": ("one_rcpt", "", USERS),
    "one_rcpt-limit1": ("one_rcpt", "smtp_destination_recipient_limit = 1", USERS),
    "tempfail": ("tempfail", "", USERS),
    "tempfail-quota": ("tempfail", "", USERS[:3] + ("full",)),
    "one_rcpt-limit1-quota": ("one_rcpt", "smtp_destination_recipient_limit = 1", USERS[:3] + ("full",)),
}

POSTFIX_DEFAULTS = "queue_run_delay = 300s\nminimal_backoff_time = 300s\nmaximal_backoff_time = 4000s"


class _Cleanups:
    """
    Stands in for the test case that L{Processes} registers its cleanups with.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[Callable, tuple, dict]] = []

    def addCleanup(self, f: Callable, *args: object, **kw: object) -> None:
        self._calls.append((f, args, kw))

    def run(self) -> None:
        while self._calls:
            f, args, kw = self._calls.pop()
            f(*args, **kw)


def copies(dovecot: str, user: str) -> int:
    new = os.path.join(dovecot, "mail", user, "Maildir", "new")
    return len(os.listdir(new)) if os.path.isdir(new) else 0


def runCase(name: str, postfixDefaults: bool, limit: float) -> dict:
    split, main, recipients = CASES[name]
    cleanups = _Cleanups()
    try:
        procs = Processes(cleanups)  # type: ignore[arg-type]
        dovecot = procs.dovecot()
        relay = procs.relayConfig(
            "hostname relay.test\nsmtp tcp://127.0.0.1:{port} {\n"
            f"    deliver_to lmtp unix://{dovecot}/lmtp {{\n        lmtp_split {split}\n    }}\n}}\n"
        )
        client = procs.postfix("client", str(relay), main="\n".join(
            filter(None, [main, POSTFIX_DEFAULTS if postfixDefaults else ""])))
        deliverable = [r for r in recipients if r != "full"]
        start = time.monotonic()
        client.sendmail("s@example.org", list(recipients), MESSAGE)
        done = None
        while time.monotonic() - start < limit:
            if done is None and all(copies(dovecot, u) for u in deliverable):
                done = time.monotonic() - start
                if "quota" not in name:
                    break  # nothing more to come; over-quota cases are watched for duplicates
            time.sleep(0.2)
        log = client.log()
        return {
            "case": name,
            "all delivered s": f"{done:.1f}" if done is not None else f"> {limit:.0f}",
            "queue runs": len(re.findall(r"qmgr\[\d+\]: \w+: from=<s@example\.org>, .*\(queue active\)", log)),
            "rcpt attempts": len(re.findall(r"postfix/smtp\[\d+\]: \w+: to=<", log)),
            "deferred": len(re.findall(r" status=deferred ", log)),
            "copies": " ".join(f"{u}={copies(dovecot, u)}" for u in recipients),
            "watched s": f"{time.monotonic() - start:.0f}",
        }
    finally:
        cleanups.run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--postfix-defaults", action="store_true",
                        help="Postfix's own retry timers instead of the tests' short ones")
    parser.add_argument("--limit", type=float, default=None,
                        help="seconds to watch each case (default 60, 2700 with --postfix-defaults)")
    args = parser.parse_args()
    limit = args.limit or (2700.0 if args.postfix_defaults else 60.0)
    timers = "Postfix defaults (300s/300s/4000s)" if args.postfix_defaults else "short (5s/5s/30s)"
    print(f"retry timers: {timers}; watch limit {limit:.0f}s", flush=True)
    for name in args.cases.split(","):
        row = runCase(name, args.postfix_defaults, limit)
        print("  ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
