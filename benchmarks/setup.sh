#!/bin/sh
# Install what benchmarks/run.py needs (Debian 12, as root):
#   postfix (smtp-source, smtp-sink, and the Postfix peer), swaks (manual
#   checks), GNU time, stunnel4 (implicit TLS for workloads vi and vii), openssl
#   (their self-made CA), and aiosmtpd (its Proxy handler is a peer) into the
#   venv peers/venv/ (git-ignored).
# With WITH_HARAKA=1 also Node.js + npm and Haraka 3 from npm into peers/npm/
# (git-ignored); without it the Haraka peer is simply skipped by run.py.
# The system Postfix instance is left unconfigured and stopped: the harness
# runs its own instances from private config dirs on loopback high ports.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
WITH_HARAKA=${WITH_HARAKA:-0}

need_apt=0
command -v smtp-source >/dev/null || need_apt=1
command -v swaks >/dev/null || need_apt=1
[ -x /usr/bin/time ] || need_apt=1
command -v stunnel >/dev/null || need_apt=1
command -v openssl >/dev/null || need_apt=1
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt=1
if [ "$WITH_HARAKA" = 1 ]; then
    command -v node >/dev/null || need_apt=1
    command -v npm >/dev/null || need_apt=1
fi

if [ "$need_apt" = 1 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "setup.sh: postfix/swaks/time/stunnel4/openssl (apt) are missing; run this as root" >&2
        exit 1
    fi
    # "No configuration": no /etc/postfix/main.cf, nothing listens on :25
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt-get update
    pkgs="postfix swaks time python3-venv stunnel4 openssl"
    if [ "$WITH_HARAKA" = 1 ]; then
        command -v node >/dev/null || pkgs="$pkgs nodejs"
        command -v npm >/dev/null || pkgs="$pkgs npm"
    fi
    apt-get install -y --no-install-recommends $pkgs
fi

# If a package script started the system instance, stop it (it is ours).
if [ "$(id -u)" = 0 ] && postfix status >/dev/null 2>&1; then
    echo "stopping the system postfix instance"
    postfix stop || true
fi

if [ "$WITH_HARAKA" = 1 ] &&
   [ ! -f "$here/peers/npm/node_modules/Haraka/bin/haraka" ]; then
    mkdir -p "$here/peers/npm"
    cd "$here/peers/npm"
    [ -f package.json ] || cat > package.json <<'EOF'
{
  "name": "bench-peer-haraka",
  "private": true,
  "description": "Haraka peer for the SMTP relay benchmark (installed by benchmarks/setup.sh)"
}
EOF
    npm install --no-audit --no-fund Haraka@3
fi

if [ ! -x "$here/peers/venv/bin/python" ] ||
   ! "$here/peers/venv/bin/python" -c 'import aiosmtpd' 2>/dev/null; then
    python3 -m venv "$here/peers/venv"
    "$here/peers/venv/bin/pip" install -q aiosmtpd
fi

haraka="haraka: not installed (WITH_HARAKA=1 to add it)"
if [ -f "$here/peers/npm/node_modules/Haraka/package.json" ] && command -v node >/dev/null; then
    haraka="haraka $(node -p 'require("'"$here"'/peers/npm/node_modules/Haraka/package.json").version'), node $(node --version)"
fi
echo "ok: $(postconf -d -h mail_version 2>/dev/null | sed 's/^/postfix /'), $haraka, \
aiosmtpd $("$here/peers/venv/bin/python" -c 'import aiosmtpd; print(aiosmtpd.__version__)')"
