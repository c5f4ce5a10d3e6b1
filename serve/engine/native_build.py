"""Build a C source into a shared library once per machine, named by a hash of its source and flags.

The library is looked for in the given folders in order (the image builds it beside its source, in a build stage
of its own: ``python3 serve/engine/native_build.py FOLDER SOURCE...``, so the image needs no compiler); where none
has it, it is compiled into the last folder with the machine's C compiler (the ``CC`` setting, else ``cc`` or
``gcc``). This module imports nothing from the package and no torch, so that stage runs it with a bare python3.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
BUILD_TIMEOUT_S = 120


class NoCompiler(OSError):
    """No built library was found and no C compiler is on PATH to build one."""


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


def avx2_unusable(flags: Optional[set[str]] = None) -> Optional[str]:
    """Why this machine cannot run a library built with FLAGS (None when it can)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"the CPU is {platform.machine()}, not x86-64"
    missing = {"avx2", "fma"} - (cpu_flags() if flags is None else flags)
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


def library_name(source: Path, flags: Sequence[str] = FLAGS) -> str:
    """``<source stem>-<hash of the source and flags>.so``."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    return f"{source.stem}-{digest}.so"


def find_or_build(source: Path, folders: Sequence[Path], c_compiler: Optional[str] = None) -> Path:
    """The library of ``source`` from the first of ``folders`` that has it, else built into the last one."""
    name = library_name(source)
    for folder in folders:
        if (folder / name).exists():
            return folder / name
    named = c_compiler or None
    cc = shutil.which(named) if named else shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise NoCompiler(f"no C compiler ({named or 'cc or gcc'}) on PATH to build {source.name}")
    return build(cc, source, folders[-1] / name)


def build(cc: str, source: Path, path: Path) -> Path:
    """Compile ``source`` to a temporary file beside ``path``, then move it into place (concurrent starts race
    harmlessly: the last rename wins with the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(handle)
    try:
        result = subprocess.run(
            [cc, *FLAGS, str(source), "-o", temporary], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
        )
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{cc} exited with {result.returncode}: {result.stderr}")
        os.replace(temporary, path)
        log.info("%s built with %s into %s", source.name, cc, path)
        return path
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


if __name__ == "__main__":  # the image's build stage: python3 native_build.py FOLDER SOURCE... (none off x86-64)
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    not_x86 = avx2_unusable(flags={"avx2", "fma"})  # the build host's own flags do not matter, only its ISA
    if not_x86:
        print(f"no native kernels: {not_x86}")
        sys.exit(0)
    for named_source in sys.argv[2:]:
        print(find_or_build(Path(named_source), [Path(sys.argv[1])]))
