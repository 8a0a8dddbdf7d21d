#!/bin/sh
# Build the smtprelay image with podman:  contrib/container/build.sh [TAG]   (default localhost/smtprelay)
#
# The base is localhost/debian:bookworm unless SMTPRELAY_BASE names another image (such as
# docker.io/library/debian:bookworm-slim).  That local base needs no registry: as root on
# Debian, container.sh (beside this script) installs podman if it is missing and builds the
# base from the machine's Debian mirror.  Where HTTPS is intercepted by a local CA, the
# host's CA bundle is handed to pip inside the build.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
tag=${1:-localhost/smtprelay}
base=${SMTPRELAY_BASE:-localhost/debian:bookworm}

command -v podman >/dev/null || sh "$here/container.sh" setup
[ "$base" != localhost/debian:bookworm ] || sh "$here/container.sh" base >/dev/null

set -- --format docker --network host --build-arg BASE="$base"
bundle=/etc/ssl/certs/ca-certificates.crt
if [ -f "$bundle" ]; then
    set -- "$@" -v "$bundle:/etc/host-ca.crt:ro" --build-arg PIP_CERT=/etc/host-ca.crt
fi
exec podman build "$@" -f "$here/Containerfile" -t "$tag" "$here/../.."
