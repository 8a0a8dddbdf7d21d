#!/bin/sh
# The relay's user-space instructions per message (valgrind callgrind, Ir):
# a count that other jobs on the box do not change (msgs/s and CPU time do,
# by 15-25 % on a shared 2-core box), to measure what one change buys.
#
#   sh benchmarks/callgrind.sh [MESSAGES]          # smtp-source -> relay -> smtp-sink
#   TLS=1 sh benchmarks/callgrind.sh               # relay -> stunnel (TLS) -> smtp-sink
#   UP=1 TLS=1 D= sh benchmarks/callgrind.sh 150   # TLS both sides, a session per message
#
# PYTHON (default .venv/bin/python of this tree) runs twistd with this tree
# first on PYTHONPATH. The relay starts under callgrind with instrumentation
# off; 20 warm-up messages; instrumentation on for MESSAGES (300) messages of
# 1 KB over one session (-d; D= for a session per message); then the total
# Ir is divided by MESSAGES. Repeated runs agree within 0.5 %. Syscalls
# (kernel time) are not counted: see `strace -c -f` in results/README.md.
# Every process started here is stopped here, by PID; all on 127.0.0.1.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
py=${PYTHON:-$root/.venv/bin/python}
n=${1:-300}
d=$(mktemp -d "${TMPDIR:-/tmp}/smtprelay-callgrind.XXXXXX")
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
p1=$(port); p2=$(port); p3=$(port); p4=$(port)
pids=""
cleanup() { for p in $pids; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$d"; }
trap cleanup EXIT INT TERM
tunnel() { # name accept connect client?
    {
        printf 'foreground = yes\nsyslog = no\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n[%s]\naccept = 127.0.0.1:%s\nconnect = 127.0.0.1:%s\n' "$1" "$2" "$3"
        if [ "$4" = yes ]; then echo 'client = yes'; else printf 'cert = %s\nkey = %s\n' "$d/pki/cert.pem" "$d/pki/key.pem"; fi
    } > "$d/$1.conf"
    stunnel "$d/$1.conf" 2> "$d/$1.log" & pids="$! $pids"
}
down="tcp://127.0.0.1:$p2"; listen=tcp; src=$p1; client=""; server=""
if [ -n "${TLS:-}${UP:-}" ]; then
    (cd "$here" && python3 -c "import sys; from tls import make_pki; make_pki(sys.argv[1])" "$d/pki")
fi
if [ -n "${TLS:-}" ]; then
    tunnel sink "$p3" "$p2" no
    down="tls://127.0.0.1:$p3"
    client="tls_client { root_ca $d/pki/ca.pem }"
fi
if [ -n "${UP:-}" ]; then
    tunnel source "$p4" "$p1" yes
    listen=tls; src=$p4; server="tls $d/pki/cert.pem $d/pki/key.pem"
fi
printf 'hostname bench.test\n%s\n%s\nsmtp %s://127.0.0.1:%s {\n    deliver_to smtp %s\n}\n' \
    "$client" "$server" "$listen" "$p1" "$down" > "$d/relay.conf"
smtp-sink -u nobody "127.0.0.1:$p2" 100 & pids="$! $pids"
PYTHONPATH=$root valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$d/cg.out" \
    "$py" "$(dirname "$py")/twistd" -n --pidfile= smtprelay --config "$d/relay.conf" > "$d/relay.log" 2>&1 &
relay=$!; pids="$relay $pids"
i=0
until python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).recv(10)" "$src" 2>/dev/null; do
    i=$((i + 1)); [ $i -le 240 ] || { echo "callgrind.sh: the relay did not start" >&2; tail "$d/relay.log" >&2; exit 1; }
    sleep 0.5
done
load() { smtp-source -s 1 -m "$1" -l 1024 $2 -f s@bench.test -t rcpt@bench.test -M bench.test "127.0.0.1:$src"; }
load 20 -d
callgrind_control -i on "$relay" > /dev/null 2>&1
load "$n" "${D--d}"
sleep 1
callgrind_control -i off "$relay" > /dev/null 2>&1
kill "$relay"; wait "$relay" 2>/dev/null || true
total=$(sed -n 's/^totals: //p' "$d"/cg.out* | head -1)
sessions="one session"; [ -n "${D--d}" ] || sessions="a session per message"
echo "Ir per message: $((total / n)) ($n messages, ${TLS:+TLS downstream, }${UP:+TLS listener, }$sessions)"
