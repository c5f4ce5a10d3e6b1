#!/usr/bin/env bash
# Install the daemon-less image tools from Debian's packages when any is missing (idempotent).
set -euo pipefail

missing=()
for pair in buildah:buildah podman:podman debootstrap:debootstrap docker-registry:docker-registry; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
