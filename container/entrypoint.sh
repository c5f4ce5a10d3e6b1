#!/usr/bin/env bash
# SageMaker runs `docker run IMAGE serve`: start gunicorn (exec, so SIGTERM reaches it directly).
# Any other command is run as given, e.g. `docker run IMAGE bash`.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$(dirname "$here")${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck source=container/cuda_compat.sh
source "$here/cuda_compat.sh"
cuda_compat_setup  # older host NVIDIA driver: CUDA forward-compat libraries first on LD_LIBRARY_PATH

if [ "${1:-serve}" = "serve" ]; then
    [ $# -gt 0 ] && shift
    export SERVE_STARTED_AT="${SERVE_STARTED_AT:-$(date +%s.%N)}"  # cold start is measured from here
    exec gunicorn --config "$here/gunicorn.conf.py" "$@"
fi
exec "$@"
