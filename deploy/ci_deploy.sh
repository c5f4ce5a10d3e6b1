#!/usr/bin/env bash
# CI deploy: push the image (or take IMAGE_URI) -> deploy.py -> smoke test (invoke.py: predict + predict_stream)
# -> teardown (cleanup.py), always, via an EXIT trap. Exits non-zero when any step fails, teardown included.
#
# Environment (only AWS credentials are required; the workflow gets them through OIDC):
#   IMAGE_URI             image to deploy; unset: deploy/push_image.sh builds and pushes one, and its last line of
#                         stdout is taken as the image URI
#   AWS_REGION            region (default us-east-1; exported as AWS_DEFAULT_REGION too)
#   ENDPOINT_NAME         endpoint (and model / endpoint config) name (default llm-serve-ci-<UTC time>-<random>)
#   ROLE                  execution role ARN (default: deploy.py's lookup: get_execution_role(), else the IAM role
#                         sagemaker_execution_role)
#   INSTANCE_TYPE         default ml.g5.2xlarge          INSTANCE_COUNT   default 1
#   HF_MODEL_ID           model to serve (default unset: the image's embedded model)
#   SM_NUM_GPUS           default 1                      STARTUP_TIMEOUT  default 300 (seconds)
#   MESSAGES_API_ENABLED  true (default) or false; picks the smoke test's payload (messages or TGI inputs)
#   DEPLOY_ARGS           extra deploy.py flags, word-split (e.g. "--max-instances 2 --env MAX_TOTAL_TOKENS=4096")
#   INVOKE_ARGS           extra invoke.py flags, word-split (e.g. "--max-tokens 32")
#   PYTHON                interpreter with requirements-deploy.txt (default .venv-deploy/bin/python, else python3)
#   BEFORE_SMOKE_TEST     a shell command run after deploy, before the smoke test, with ENDPOINT_NAME and IMAGE_URI
#                         set (the offline rehearsal waits there for its stand-in endpoint container's /ping)
# Every AWS call honours AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME, which is how the offline
# rehearsal points this script at moto and at deploy/local_endpoint.py without changing it.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export AWS_REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-us-east-1}}"
export AWS_DEFAULT_REGION="$AWS_REGION"
ENDPOINT_NAME="${ENDPOINT_NAME:-llm-serve-ci-$(date -u +%Y%m%d-%H%M%S)-$RANDOM}"
MESSAGES_API_ENABLED="${MESSAGES_API_ENABLED:-true}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv-deploy/bin/python ]; then PYTHON=.venv-deploy/bin/python; else PYTHON=python3; fi
fi
deployed=""

step() { echo "== ci_deploy: $*"; }

teardown() {
    local status=$?
    trap - EXIT
    if [ -n "$deployed" ]; then
        step "teardown $ENDPOINT_NAME"
        if ! "$PYTHON" deploy/cleanup.py --endpoint-name "$ENDPOINT_NAME" --region "$AWS_REGION"; then
            echo "ci_deploy: teardown failed; delete $ENDPOINT_NAME by hand" >&2
            [ "$status" -ne 0 ] || status=1
        fi
    fi
    if [ "$status" -eq 0 ]; then step "passed"; else step "FAILED (exit $status)"; fi
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ -z "${IMAGE_URI:-}" ]; then
    step "push image (deploy/push_image.sh)"
    IMAGE_URI="$(deploy/push_image.sh | tail -n 1)"
    [ -n "$IMAGE_URI" ] || { echo "ci_deploy: push_image.sh printed no image URI" >&2; exit 1; }
fi

case "${MESSAGES_API_ENABLED,,}" in
    true|1|yes) messages_flag=--messages-api; payload=messages ;;
    false|0|no) messages_flag=--no-messages-api; payload=inputs ;;
    *) echo "ci_deploy: MESSAGES_API_ENABLED must be true or false, got '$MESSAGES_API_ENABLED'" >&2; exit 2 ;;
esac

deploy_args=(--image-uri "$IMAGE_URI" --endpoint-name "$ENDPOINT_NAME" --region "$AWS_REGION"
    --instance-type "${INSTANCE_TYPE:-ml.g5.2xlarge}" --instance-count "${INSTANCE_COUNT:-1}"
    --num-gpus "${SM_NUM_GPUS:-1}" --startup-timeout "${STARTUP_TIMEOUT:-300}" "$messages_flag")
[ -z "${HF_MODEL_ID:-}" ] || deploy_args+=(--model-id "$HF_MODEL_ID")
[ -z "${ROLE:-}" ] || deploy_args+=(--role "$ROLE")
# shellcheck disable=SC2206  # word-splitting the extra flags is the point
deploy_args+=(${DEPLOY_ARGS:-})

step "deploy $IMAGE_URI as $ENDPOINT_NAME"
deployed=1  # from here on something may exist, even if deploy.py fails half-way
"$PYTHON" deploy/deploy.py "${deploy_args[@]}"

if [ -n "${BEFORE_SMOKE_TEST:-}" ]; then
    step "before smoke test: $BEFORE_SMOKE_TEST"
    ENDPOINT_NAME="$ENDPOINT_NAME" IMAGE_URI="$IMAGE_URI" bash -c "$BEFORE_SMOKE_TEST"
fi

step "smoke test $ENDPOINT_NAME ($payload)"
# shellcheck disable=SC2086
"$PYTHON" deploy/invoke.py --endpoint-name "$ENDPOINT_NAME" --region "$AWS_REGION" --payload "$payload" ${INVOKE_ARGS:-}
