#!/usr/bin/env bash
# The test build of ./Dockerfile with buildah (no daemon needed): the Debian bookworm base from base.sh and the CPU
# torch wheel from a cache folder mounted into the build. Only build args differ from the production build.
set -euo pipefail
cd "$(dirname "$0")/../.."

cache="${IMAGE_CACHE_DIR:-$HOME/.cache/sagemaker-llm-serve/image}"
image="${IMAGE:-localhost/sagemaker-llm-serve:cpu-test}"
base="${BASE_IMAGE:-localhost/debian-bookworm:base}"
torch_version="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' requirements.txt)"
wheels="$cache/wheels"

if ! compgen -G "$wheels/torch-$torch_version+cpu-cp311-*.whl" >/dev/null; then
    echo "fetching the CPU torch $torch_version wheel into $wheels (once)" >&2
    "${PIP:-pip}" download --quiet --no-deps --only-binary=:all: --implementation cp --python-version 3.11 \
        --platform manylinux_2_28_x86_64 --dest "$wheels" "torch==$torch_version+cpu"
fi

flags=(--format docker --layers --isolation chroot --network host -v "$wheels:/wheels:ro"
    --build-arg BASE_IMAGE="$base" --build-arg TORCH_SPEC="torch==$torch_version+cpu" --build-arg TORCH_FIND_LINKS=/wheels)
# pip inside the build reaches the package index only through the host's CA bundle
[ ! -f /etc/ssl/certs/ca-certificates.crt ] || flags+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
if [ "${1:-}" = "--print-flags" ]; then  # for other builders of the same test image (deploy/push_image.sh BUILD_FLAGS)
    echo "${flags[*]}"
    exit 0
fi

started=$(date +%s.%N)
# shellcheck disable=SC2086  # BUILD_ARGS is word-split on purpose
buildah bud "${flags[@]}" ${BUILD_ARGS:-} -t "$image" .
seconds=$(echo "$(date +%s.%N) - $started" | bc)
size=$(buildah images --format '{{.Size}}' "$image" | head -n1)
echo "built $image in ${seconds} s; size $size"
