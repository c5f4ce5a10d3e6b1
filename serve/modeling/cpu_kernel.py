"""The CPU panel kernel (``cpu_kernel.c``): float32 linear layers over weights repacked into 16-feature panels.

At batch 1 to 32 a decode step on the CPU is mostly the reading of weights, which oneDNN's packed GEMM reads well
below the machine's streaming rate; this kernel streams each panel front to back, and was faster than oneDNN from
single rows up to prefill chunks (figures: docs/settings.md, "The CPU panel kernel").

The library is named by a hash of the source and flags. It is looked for beside this file (the image builds it
there, in a build stage of its own: ``python3 serve/modeling/cpu_kernel.py FOLDER``, so the image needs no compiler),
then in ``<SERVE_CACHE_DIR>/kernels``; if absent, it is compiled there at first use with the machine's C compiler
(the ``CC`` setting, else ``cc`` or ``gcc``; ~0.5 s). Where it cannot be used (not x86-64 with AVX2 and FMA, no
library and no compiler, a failed build) ``load_panel_kernel`` says why and the caller keeps oneDNN's packing.

This module imports torch only to run the kernel, so the image's build stage can run it with a bare python3.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
PANEL = 16  # output features per panel (cpu_kernel.c)
BUILD_TIMEOUT_S = 120


def cpu_flags(cpuinfo: Optional[str] = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 ``flags``, Arm ``Features``); empty when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


class PanelKernel:
    """The compiled kernel: ``pack`` a weight once, then ``linear`` over it for any number of rows."""

    label = "panel kernel (AVX2+FMA)"

    def __init__(self, path: Path):
        import torch  # once here, not in every call of the decode loop

        self.torch, self.path = torch, path
        self.library = ctypes.CDLL(str(path))
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        self.library.serve_pack_panels.argtypes = [pointer, size, size, pointer]
        self.library.serve_pack_panels.restype = None
        self.library.serve_linear_panels.argtypes = [pointer, size, pointer, size, size, pointer, pointer, ctypes.c_int]
        self.library.serve_linear_panels.restype = None

    def pack(self, weight: "torch.Tensor") -> "torch.Tensor":
        """A float32 weight [out, in] as panels [ceil(out / 16) * in * 16] (padded with zeros)."""
        weight = weight.detach().contiguous()
        out_features, in_features = weight.shape
        panels = self.torch.empty(-(-out_features // PANEL) * in_features * PANEL, dtype=self.torch.float32)
        self.library.serve_pack_panels(weight.data_ptr(), out_features, in_features, panels.data_ptr())
        return panels

    def linear(
        self, x: "torch.Tensor", panels: "torch.Tensor", bias: "Optional[torch.Tensor]", out_features: int
    ) -> "torch.Tensor":
        """``x @ weight.T + bias`` for x [..., in] float32, from the weight's panels."""
        in_features = x.shape[-1]
        rows = x.reshape(-1, in_features).contiguous()
        out = self.torch.empty(rows.shape[0], out_features, dtype=self.torch.float32)
        if rows.shape[0]:
            self.library.serve_linear_panels(
                rows.data_ptr(),
                rows.shape[0],
                panels.data_ptr(),
                out_features,
                in_features,
                None if bias is None else bias.data_ptr(),
                out.data_ptr(),
                self.torch.get_num_threads(),
            )
        return out.view(*x.shape[:-1], out_features)


def compiler(named: Optional[str] = None) -> Optional[str]:
    """The C compiler to build with: ``named`` (the CC setting) when given, else ``cc`` or ``gcc`` on PATH (None:
    none found)."""
    if named:
        return shutil.which(named)
    return shutil.which("cc") or shutil.which("gcc")


def unusable_reason(flags: Optional[set[str]] = None) -> Optional[str]:
    """Why this machine cannot run the kernel (None when it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    missing = {"avx2", "fma"} - (cpu_flags() if flags is None else flags)
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    return None


def library_name() -> str:
    """The built library's file name: a hash of the source and the flags it is compiled with."""
    return f"serve_panels-{hashlib.sha256(SOURCE.read_bytes() + ' '.join(FLAGS).encode()).hexdigest()[:16]}.so"


@functools.lru_cache(maxsize=None)
def load_panel_kernel(cache_dir: str, c_compiler: Optional[str] = None) -> tuple[Optional[PanelKernel], str]:
    """(the kernel, "") or (None, why not): the library beside this file or in ``<cache_dir>/kernels``, built
    there on first use with ``compiler(c_compiler)`` when neither has it."""
    reason = unusable_reason()
    if reason:
        return None, reason
    name = library_name()
    built = Path(os.path.expanduser(cache_dir)) / "kernels" / name
    path = next((path for path in (SOURCE.with_name(name), built) if path.exists()), None)
    try:
        if path is None:
            cc = compiler(c_compiler)
            if cc is None:
                return None, f"no C compiler ({c_compiler or 'cc or gcc'}) on PATH to build it"
            path = build(cc, built)
        return PanelKernel(path), ""
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{'loading' if path else 'building'} it failed: {str(exc).strip()[-300:]}"


def build(cc: str, path: Path) -> Path:
    """Compile the kernel to a temporary file beside ``path``, then move it into place (concurrent starts race
    harmlessly: the last rename wins with the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [cc, *FLAGS, str(SOURCE), "-o", temporary], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{cc} exited with {result.returncode}: {result.stderr}")
        os.replace(temporary, path)
        log.info("CPU panel kernel built with %s into %s", cc, path)
        return path
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


if __name__ == "__main__":  # the image's build stage: python3 cpu_kernel.py FOLDER [COMPILER] (none off x86-64)
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    not_x86 = unusable_reason(flags={"avx2", "fma"})  # the build host's own flags do not matter, only its ISA
    if not_x86:
        print(f"no panel kernel: {not_x86}")
        sys.exit(0)
    named = sys.argv[2] if len(sys.argv) > 2 else None
    cc = compiler(named)
    if cc is None:
        sys.exit(f"no C compiler ({named or 'cc or gcc'}) on PATH")
    print(build(cc, Path(sys.argv[1]) / library_name()))
