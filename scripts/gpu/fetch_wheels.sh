#!/usr/bin/env bash
# Prepare what a bare GPU machine (no network) needs to run `scripts/gpu/check.py`, into the ignored folder .whl/:
#  - cp312 manylinux wheels of the packages it lacks (its torch 2.11, transformers 5.17, accelerate, triton,
#    peft, prometheus-client, jinja2, httpx serve as installed: never ship torch, transformers or numpy here);
#  - .whl/tokenizer/: the embedded SmolLM2 tokenizer, chat template and config (no weights), from which
#    check.py writes its dummy-weights model folders (the GGUF itself is too large to travel).
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="$root/.whl"
python="${PYTHON:-python3}"
limit_mib=64

# The server (flask, gunicorn, pydantic, llguidance), the load generator (requests) and pytest, with their deps.
packages=(
    flask==3.1.3 werkzeug==3.1.9 blinker==1.9.0 itsdangerous==2.2.0 click==8.5.1
    gunicorn==27.0.1
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    llguidance==1.9.1  # manylinux_2_31 (glibc >= 2.31)
    requests==2.34.2 urllib3==2.8.0 idna==3.20 charset-normalizer==3.5.3 certifi==2026.10.19.post1
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 pytest-timeout==2.4.0
)

mkdir -p "$out"
rm -f "$out"/*.whl
for package in "${packages[@]}"; do
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d "$out" "$package"
done
case "$(ls "$out")" in *torch*|*transformers*|*numpy*) echo "refusing: a wheel would shadow the GPU's own stack" >&2; exit 1;; esac

venv_python="$root/.venv/bin/python"
[ -x "$venv_python" ] || venv_python="$python"
"$venv_python" "$root/scripts/gpu/dummy_model.py" --export-tokenizer "$out/tokenizer"

size_kib=$(du -sk "$out" | cut -f1)
echo "$(ls "$out"/*.whl | wc -l) wheels + tokenizer in $out: $((size_kib / 1024)) MiB ($size_kib KiB)"
if [ "$size_kib" -ge $((limit_mib * 1024)) ]; then
    echo "over the ${limit_mib} MiB that can travel to the GPU machine" >&2
    exit 1
fi
