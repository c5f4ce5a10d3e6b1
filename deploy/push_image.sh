#!/usr/bin/env bash
# Build the image, create its ECR repository if missing, log in, tag and push. The image URI is the last line of
# stdout (everything else goes to stderr), so `IMAGE_URI="$(deploy/push_image.sh | tail -n 1)"` works.
#
# Environment (all optional):
#   CONTAINER_TOOL  docker | buildah | podman      default: docker when its daemon answers, else buildah, podman
#   REPOSITORY      ECR repository name            default sagemaker-llm-serve
#   IMAGE_TAG       tag                            default: the git commit (short), else the UTC time
#   AWS_REGION      region                         default: boto3's (AWS_DEFAULT_REGION / profile)
#   BUILD_FLAGS     extra build flags, word-split, e.g. "--build-arg EMBED_MODEL=true"
#   LOCAL_IMAGE     push this local image instead of building one
#   REGISTRY        push to this registry host instead of the one ECR names (a mirror, or a local registry);
#                   the ECR repository and login token are still requested
#   TLS_VERIFY      false for a plain-HTTP or self-signed registry (buildah/podman --tls-verify=false; docker
#                   allows localhost registries without TLS by itself)
#   PYTHON          interpreter with boto3         default .venv-deploy/bin/python, .venv/bin/python, python3
# AWS calls go through deploy/ecr.py (boto3), so AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_ECR redirect them.
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ "${1:-}" = "-h" ] || [ "${1:-}" = "--help" ]; then
    sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 0
fi

tool="${CONTAINER_TOOL:-}"
if [ -z "$tool" ]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        tool=docker  # a docker CLI without a reachable daemon does not count
    elif command -v buildah >/dev/null 2>&1; then
        tool=buildah
    elif command -v podman >/dev/null 2>&1; then
        tool=podman
    fi
fi
case "$tool" in
    docker|buildah|podman) ;;
    "") echo "push_image: no container tool (docker, buildah or podman); set CONTAINER_TOOL" >&2; exit 2 ;;
    *) echo "push_image: CONTAINER_TOOL=$tool: use docker, buildah or podman" >&2; exit 2 ;;
esac
if [ -z "${PYTHON:-}" ]; then
    for candidate in .venv-deploy/bin/python .venv/bin/python python3; do
        if [ -x "$candidate" ] || command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
    done
fi
repository="${REPOSITORY:-sagemaker-llm-serve}"
tag="${IMAGE_TAG:-$(git rev-parse --short=12 HEAD 2>/dev/null || date -u +%Y%m%d%H%M%S)}"
region_args=()
[ -z "${AWS_REGION:-}" ] || region_args=(--region "$AWS_REGION")
tls_args=()
if [ "${TLS_VERIFY:-true}" = "false" ] && [ "$tool" != "docker" ]; then tls_args=(--tls-verify=false); fi

repository_uri="$("$PYTHON" deploy/ecr.py "${region_args[@]}" repository "$repository")"
read -r registry password < <("$PYTHON" deploy/ecr.py "${region_args[@]}" login)
if [ -n "${REGISTRY:-}" ]; then
    registry="$REGISTRY"
    repository_uri="$REGISTRY/${repository_uri#*/}"
fi
image_uri="$repository_uri:$tag"

# shellcheck disable=SC2206  # word-splitting the extra flags is the point
build_flags=(${BUILD_FLAGS:-})
if [ -n "${LOCAL_IMAGE:-}" ]; then
    echo "push_image: tagging $LOCAL_IMAGE as $image_uri" >&2
    "$tool" tag "$LOCAL_IMAGE" "$image_uri" >&2
elif [ "$tool" = "buildah" ]; then
    echo "push_image: buildah bud -> $image_uri" >&2
    buildah bud "${build_flags[@]}" -t "$image_uri" . >&2
else
    echo "push_image: $tool build -> $image_uri" >&2
    "$tool" build "${build_flags[@]}" -t "$image_uri" . >&2
fi

echo "push_image: logging in to $registry" >&2
printf '%s' "$password" | "$tool" login "${tls_args[@]}" --username AWS --password-stdin "$registry" >&2
echo "push_image: pushing $image_uri" >&2
"$tool" push "${tls_args[@]}" "$image_uri" >&2
echo "$image_uri"
