#!/bin/sh
# The benchmark, in one command (from anywhere in a clone; as root for the
# Postfix peer):
#
#   sh benchmarks/run.sh                      # SMTP downstream, all workloads
#   sh benchmarks/run.sh --downstream lmtp    # the sink speaks LMTP
#   sh benchmarks/run.sh --workloads i,iv --repeat 2   # other run.py options
#
# smtp-source -> X -> smtp-sink on 127.0.0.1 for X = direct (no relay),
# postfix, aiosmtpd and smtprelay in the same run; prints one table with the
# ratios to Postfix and the verdicts against the performance targets of the smtprelay rows.
# It installs what is missing first (setup.sh: apt packages and the aiosmtpd
# venv; `make venv`: the project in .venv). Exit status: 0 ok, 1 a run failed
# (a message did not reach the sink, a relay did not start, ...), 3 a target
# was missed. See benchmarks/README.md.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")

# 1. the tools and the peers (apt needs root; skipped when all is there)
if ! command -v smtp-source >/dev/null || ! command -v smtp-sink >/dev/null ||
   ! command -v stunnel >/dev/null ||
   [ ! -x /usr/bin/time ] ||
   ! "$here/peers/venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    echo "run.sh: installing the benchmark tools (benchmarks/setup.sh)" >&2
    sh "$here/setup.sh"
fi

# 2. the project itself in .venv (a no-op when up to date)
if command -v make >/dev/null; then
    make -s -C "$root" venv
elif [ ! -x "$root/.venv/bin/twistd" ]; then
    python3 -m venv "$root/.venv"
    (cd "$root" && .venv/bin/pip install -q -e .)
fi
if ! "$root/.venv/bin/python" -c 'import smtprelay.app.tap' 2>/dev/null; then
    echo "run.sh: the project does not import from $root/.venv" >&2
    "$root/.venv/bin/python" -c 'import smtprelay.app.tap'
    exit 1
fi

# 3. the harness, with smtprelay as its RELAY_CMD: one process, configured
#    from smtprelay.conf.in (rendered per run into the run's work dir);
#    options given to this script come last and win
exec python3 "$here/run.py" \
    --relay-name smtprelay \
    --relay-cwd "$root" \
    --relay-config "$here/smtprelay.conf.in" \
    --relay-cmd "exec '$root/.venv/bin/twistd' -n --pidfile= smtprelay --config {config}" \
    "$@"
