#!/usr/bin/env bash
# The test build's base image: Debian bookworm minbase with python3 (3.11), made with debootstrap once and cached
# as a tarball under IMAGE_CACHE_DIR, imported into container storage when storage lacks it.
set -euo pipefail

cache="${IMAGE_CACHE_DIR:-$HOME/.cache/sagemaker-llm-serve/image}"
image="${BASE_IMAGE:-localhost/debian-bookworm:base}"
tarball="$cache/debian-bookworm-minbase.tar"

if buildah inspect --type image "$image" >/dev/null 2>&1; then
    echo "base image $image: present"
    exit 0
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ]; then
    mirror="${DEBIAN_MIRROR:-$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | grep -m1 -E '/debian/?$' || true)}"
    mirror="${mirror:-http://deb.debian.org/debian}"
    root="$(mktemp -d)"
    trap 'rm -rf "$root"' EXIT
    echo "debootstrap bookworm minbase from $mirror"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >"$cache/debootstrap.log"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.partial" . && mv "$tarball.partial" "$tarball"
fi
podman import --quiet "$tarball" "$image" >/dev/null
echo "base image $image: imported from $tarball"
