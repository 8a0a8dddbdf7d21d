#!/bin/sh
# The image's entrypoint: checks the SMTPRELAY_* variables, points the imports of the image's
# configuration at the optional parts they ask for, and runs the relay in the foreground as
# PID 1 (SIGTERM drains it).  Arguments go to `twistd smtprelay` after --config: `--check`
# validates the configuration and exits; `--show` alone prints the effective configuration.
set -eu
parts=/etc/smtprelay/parts

fail() {
    echo "smtprelay: $*" >&2
    exit 2
}

# Our name in greetings and Received:; the container's own name unless set.
: "${SMTPRELAY_HOSTNAME:=$(cat /proc/sys/kernel/hostname)}"

SMTPRELAY_PART_TLS=$parts/none.conf
if [ -n "${SMTPRELAY_TLS_CERT:-}${SMTPRELAY_TLS_KEY:-}" ]; then
    [ -n "${SMTPRELAY_TLS_CERT:-}" ] && [ -n "${SMTPRELAY_TLS_KEY:-}" ] ||
        fail "SMTPRELAY_TLS_CERT and SMTPRELAY_TLS_KEY go together"
    SMTPRELAY_PART_TLS=$parts/tls.conf
fi

SMTPRELAY_PART_PROXY=$parts/none.conf
if [ -n "${SMTPRELAY_PROXY_PROTOCOL:-}" ]; then
    SMTPRELAY_PART_PROXY=$parts/proxy.conf
fi

SMTPRELAY_PART_AUTH=$parts/none.conf
if [ -n "${SMTPRELAY_AUTH_PASSWORD:-}" ] && [ -n "${SMTPRELAY_AUTH_PASSWORD_FILE:-}" ]; then
    fail "set SMTPRELAY_AUTH_PASSWORD or SMTPRELAY_AUTH_PASSWORD_FILE, not both"
elif [ -n "${SMTPRELAY_AUTH_PASSWORD:-}${SMTPRELAY_AUTH_PASSWORD_FILE:-}" ]; then
    [ -n "${SMTPRELAY_AUTH_USER:-}" ] || fail "a password needs SMTPRELAY_AUTH_USER"
    SMTPRELAY_PART_AUTH=$parts/auth-password.conf
    [ -z "${SMTPRELAY_AUTH_PASSWORD_FILE:-}" ] || SMTPRELAY_PART_AUTH=$parts/auth-file.conf
elif [ -n "${SMTPRELAY_AUTH_USER:-}" ]; then
    fail "SMTPRELAY_AUTH_USER needs SMTPRELAY_AUTH_PASSWORD or SMTPRELAY_AUTH_PASSWORD_FILE"
fi

if [ -z "${SMTPRELAY_TARGETS:-}" ] && grep -q '{env:SMTPRELAY_TARGETS}' "$SMTPRELAY_CONFIG"; then
    fail "set SMTPRELAY_TARGETS to the downstream servers, e.g. tcp://mx.example.net:25"
fi

export SMTPRELAY_HOSTNAME SMTPRELAY_PART_TLS SMTPRELAY_PART_PROXY SMTPRELAY_PART_AUTH
if [ "$*" = --show ]; then
    exec smtprelay-check --show "$SMTPRELAY_CONFIG"
fi
exec twistd --nodaemon --pidfile= smtprelay --config "$SMTPRELAY_CONFIG" "$@"
