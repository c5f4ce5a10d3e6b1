# CUDA forward compatibility, sourced by entrypoint.sh before the command starts.
#
# torch's CUDA 13 wheels need a newer NVIDIA driver than older SageMaker GPU hosts run. NVIDIA's forward-compat
# package (in the CUDA base image at /usr/local/cuda/compat) carries a newer user-mode driver (libcuda) that works
# over an older kernel driver on data-centre GPUs. It goes first on LD_LIBRARY_PATH only when the host's kernel
# driver is older than it: a host with a newer driver keeps its own libcuda. No GPU (no driver): nothing changes.
# CUDA_COMPAT_DIR and NVIDIA_DRIVER_VERSION_FILE override the two locations.

cuda_compat_setup() {
    local compat_dir="${CUDA_COMPAT_DIR:-/usr/local/cuda/compat}"
    local version_file="${NVIDIA_DRIVER_VERSION_FILE:-/proc/driver/nvidia/version}"
    local libs=("$compat_dir"/libcuda.so.*.*)
    [ -e "${libs[0]}" ] && [ -r "$version_file" ] || return 0
    local compat_version="${libs[0]##*/libcuda.so.}"
    local driver_version
    driver_version="$(grep -m1 '^NVRM' "$version_file" | grep -oE '\b[0-9]+\.[0-9]+(\.[0-9]+)?\b' | head -n1 || true)"
    [ -n "$driver_version" ] || return 0
    local oldest
    oldest="$(printf '%s\n%s\n' "$driver_version" "$compat_version" | sort -V | head -n1)"
    if [ "$driver_version" != "$compat_version" ] && [ "$oldest" = "$driver_version" ]; then
        export LD_LIBRARY_PATH="$compat_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "cuda compat: host driver $driver_version is older than $compat_version; using $compat_dir" >&2
    else
        echo "cuda compat: host driver $driver_version is at least $compat_version; compat libraries not used" >&2
    fi
}
