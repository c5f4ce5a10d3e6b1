"""The CPU panel kernel (``cpu_kernel.c``): linear layers over weights repacked into 16-feature panels, float32 on
x86-64 with AVX2 and FMA, bfloat16 where the CPU also has AVX-512 BF16; and ``LayerOps``, a float32 layer's RMSNorm,
SiLU gate and rotary embedding in one pass each.

At batch 1 to 32 a decode step on the CPU is mostly the reading of weights, which oneDNN's packed GEMM reads well
below the machine's streaming rate; this kernel streams each panel front to back, and was faster than oneDNN from
single rows up to prefill chunks; its bf16 panels hold half the bytes (figures: docs/settings.md, "The CPU panel
kernel").

The library is named by a hash of the source and flags. It is looked for beside this file (the image builds it
there, in a build stage of its own: ``python3 serve/modeling/cpu_kernel.py FOLDER``, so the image needs no compiler),
then in ``<SERVE_CACHE_DIR>/kernels``; if absent, it is compiled there at first use with the machine's C compiler
(the ``CC`` setting, else ``cc`` or ``gcc``; ~0.5 s). Where it cannot be used (not x86-64 with AVX2 and FMA, no
library and no compiler, a failed build) ``load_panel_kernel`` says why and the caller keeps oneDNN's packing. The
bf16 functions carry their own target flags inside the same library and are called only where the CPU has
``avx512_bf16`` (``PanelKernel.bf16_missing`` says why not elsewhere).

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
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
PANEL = 16  # output features per panel (cpu_kernel.c)
BF16_NEEDS = frozenset({"avx512f", "avx512_bf16"})  # CPU flags the bf16 functions run on
WIDE_NEEDS = frozenset({"avx512f"})  # CPU flags the float32 AVX-512 tile runs on
WIDE_LABEL = "panel kernel (AVX-512F; AVX2+FMA for one row)"
BUILD_TIMEOUT_S = 120
OPERATOR_SCHEMA = "(Tensor x, Tensor panels, Tensor? bias, int out_features, str library) -> Tensor"
LOADED: dict[str, "PanelKernel"] = {}  # by library path: what torch.ops.serve.panel_linear runs
LOADED_OPERATORS: dict[str, Any] = {}  # the operator, once defined


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
    """The compiled kernel: ``pack`` a weight once, then ``linear`` over it for any number of rows. ``labels`` maps
    each weight dtype it takes (float32, and bfloat16 unless ``bf16_missing`` says why not) to its name."""

    label = "panel kernel (AVX2+FMA)"

    def __init__(self, path: Path, flags: Optional[set[str]] = None):
        import torch  # once here, not in every call of the decode loop

        self.torch, self.path = torch, path
        self.library = ctypes.CDLL(str(path))
        declare(self.library)
        flags = cpu_flags() if flags is None else flags
        self.bf16_missing = bf16_unusable_reason(self.library, flags)
        # float32 steps of two or more rows on the AVX-512F tile (the same results, 1.3-1.8x at 8-16 rows); one row
        # stays on the AVX2 tile, which streams a lone row's weights as fast
        self.wide = WIDE_NEEDS <= flags
        self.label = WIDE_LABEL if self.wide else self.label
        self.labels = {torch.float32: self.label}
        if self.bf16_missing is None:
            self.labels[torch.bfloat16] = "panel kernel (AVX-512 BF16)"
        self.layer_ops = LayerOps(self)
        self.key = str(path)
        LOADED.setdefault(self.key, self)
        define_operator(torch)

    def pack(self, weight: "torch.Tensor") -> "torch.Tensor":
        """A weight [out, in] as panels: float32 [ceil(out / 16) * in * 16], bfloat16 [ceil(out / 16) *
        ceil(in / 2) * 32] (input pairs), padded with zeros."""
        if weight.dtype not in self.labels:
            raise ValueError(f"the panel kernel takes {' or '.join(map(str, self.labels))}, not {weight.dtype}")
        weight = weight.detach().contiguous()
        out_features, in_features = weight.shape
        panels = -(-out_features // PANEL)
        if weight.dtype == self.torch.float32:
            packed = self.torch.empty(panels * in_features * PANEL, dtype=weight.dtype)
            self.library.serve_pack_panels(weight.data_ptr(), out_features, in_features, packed.data_ptr())
        else:
            packed = self.torch.empty(panels * -(-in_features // 2) * 2 * PANEL, dtype=weight.dtype)
            self.library.serve_pack_panels_bf16(weight.data_ptr(), out_features, in_features, packed.data_ptr())
        return packed

    def linear(
        self, x: "torch.Tensor", panels: "torch.Tensor", bias: "Optional[torch.Tensor]", out_features: int
    ) -> "torch.Tensor":
        """``x @ weight.T + bias`` for x [..., in], from the weight's panels, in the panels' dtype. Under
        torch.compile, one opaque operator (a ctypes call cannot be traced); eagerly, the call itself."""
        if self.torch.compiler.is_compiling():
            return self.torch.ops.serve.panel_linear(x, panels, bias, out_features, self.key)
        return self.run(x, panels, bias, out_features)

    def linear_plus(
        self,
        x: "torch.Tensor",
        panels: "torch.Tensor",
        bias: "Optional[torch.Tensor]",
        out_features: int,
        residual: "torch.Tensor",
    ) -> "torch.Tensor":
        """``residual + linear(x)``: float32 panels add a contiguous float32 residual as they store each output (no
        pass of its own, the same sums); otherwise the sum after."""
        torch = self.torch
        fits = residual.dtype == panels.dtype == torch.float32 and residual.is_contiguous()
        if not fits or residual.shape != (*x.shape[:-1], out_features) or torch.compiler.is_compiling():
            return residual + self.linear(x, panels, bias, out_features)
        return self.run(x, panels, bias, out_features, residual)

    def run(
        self,
        x: "torch.Tensor",
        panels: "torch.Tensor",
        bias: "Optional[torch.Tensor]",
        out_features: int,
        residual: "Optional[torch.Tensor]" = None,
    ) -> "torch.Tensor":
        """The library's call for ``linear`` (and, float32 only, ``linear_plus``'s ``residual``)."""
        in_features, dtype = x.shape[-1], panels.dtype
        rows = x  # a decode step's rows usually come as they are needed: 2-D, contiguous, the panels' dtype
        if x.dim() != 2 or x.dtype != dtype or not x.is_contiguous():
            rows = x.reshape(-1, in_features).to(dtype).contiguous()
        out = self.torch.empty(rows.shape[0], out_features, dtype=dtype)
        if rows.shape[0]:
            bias_at = None if bias is None else bias.to(dtype).contiguous().data_ptr()
            args = (rows.data_ptr(), rows.shape[0], panels.data_ptr(), out_features, in_features, bias_at)
            threads = self.torch.get_num_threads()
            if dtype == self.torch.float32:
                wide = self.wide and rows.shape[0] > 1
                function = self.library.serve_linear_panels_512 if wide else self.library.serve_linear_panels
                function(*args, None if residual is None else residual.data_ptr(), out.data_ptr(), threads)
            elif self.library.serve_linear_panels_bf16(*args, out.data_ptr(), threads):  # pads an odd input size's x
                raise MemoryError(f"the panel kernel could not pad {rows.shape[0]} rows of {in_features} inputs")
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out_features)


class LayerOps:
    """A float32 layer's elementwise work in one pass each (``cpu_kernel.c``), for the lean model's RMSNorm, MLP
    and rotary embedding on the CPU. Each takes contiguous float32 CPU tensors (the callers check ``takes``)."""

    def __init__(self, kernel: "PanelKernel"):
        self.kernel, self.library, self.torch = kernel, kernel.library, kernel.torch

    def fused_halves(self, sizes: dict, eps: tuple[float, float], weights: dict, parts: tuple) -> "FusedHalves":
        """A decoder layer's two halves as one call each (``FusedHalves``)."""
        return FusedHalves(self.kernel, sizes, eps, weights, parts)

    def takes(self, *tensors: "torch.Tensor") -> bool:
        """Whether every tensor is a contiguous float32 CPU tensor, and no torch.compile is tracing."""
        float32 = self.torch.float32
        if self.torch.compiler.is_compiling():
            return False
        return all(t.dtype == float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)

    def rms_norm(self, x: "torch.Tensor", weight: "torch.Tensor", eps: float) -> "torch.Tensor":
        """x / sqrt(mean(x^2) + eps) * weight over the last dimension."""
        out = self.torch.empty_like(x)
        size = x.shape[-1]
        self.library.serve_rms_norm(
            x.data_ptr(), x.numel() // size, size, weight.data_ptr(), eps, out.data_ptr(), self.torch.get_num_threads()
        )
        return out

    def silu_mul(self, gate_up: "torch.Tensor") -> "torch.Tensor":
        """silu(gate) * up from the fused projection's rows [..., 2n] -> [..., n]."""
        size = gate_up.shape[-1] // 2
        out = gate_up.new_empty((*gate_up.shape[:-1], size))
        rows = gate_up.numel() // (2 * size)
        self.library.serve_silu_mul(gate_up.data_ptr(), rows, size, out.data_ptr(), self.torch.get_num_threads())
        return out

    def rope_(self, heads: "torch.Tensor", count: int, cos: "torch.Tensor", signed_sin: "torch.Tensor") -> None:
        """Rotate the first ``count`` heads of heads [tokens, all heads, dim] in place (``layers.rotate_``)."""
        tokens, _, dim = heads.shape
        self.library.serve_rope(
            heads.data_ptr(), tokens, heads.stride(0), count, dim, cos.data_ptr(), signed_sin.data_ptr(),
            self.torch.get_num_threads(),
        )  # fmt: skip


class LayerPlan(ctypes.Structure):
    """cpu_kernel.c's LayerPlan: a float32 decoder layer's sizes and weights, for its two halves in one call each."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in (
            "hidden", "qkv_out", "rotated_heads", "head_dim", "attended", "intermediate"
        )),
        ("eps_in", ctypes.c_float),
        ("eps_post", ctypes.c_float),
        *((name, ctypes.c_void_p) for name in (
            "norm_in", "qkv", "qkv_bias", "o", "o_bias", "norm_post", "gate_up", "gate_up_bias", "down", "down_bias"
        )),
        ("wide", ctypes.c_int),
    ]  # fmt: skip


class FusedHalves:
    """A float32 decoder layer's work before attention (input norm, q/k/v, rotary) and after it (o projection and
    residual, norm, gate/up, SiLU gate, down projection and residual), each one call of the library: the same
    functions in the same order as the layer's modules call them one by one, so the same bits.

    ``weights`` maps the LayerPlan's weight names to tensors (float32, contiguous; the linear layers' panels), which
    this object keeps alive; ``parts`` are the modules they came from, for the caller to check they still serve."""

    def __init__(self, kernel: "PanelKernel", sizes: dict, eps: tuple[float, float], weights: dict, parts: tuple):
        self.torch, self.library, self.parts = kernel.torch, kernel.library, parts
        self.weights = weights
        pointers = {name: None if tensor is None else tensor.data_ptr() for name, tensor in weights.items()}
        self.plan = LayerPlan(**sizes, eps_in=eps[0], eps_post=eps[1], **pointers, wide=int(kernel.wide))
        self.plan_at = ctypes.byref(self.plan)
        self.qkv_out, self.hidden = sizes["qkv_out"], sizes["hidden"]

    def before(self, hidden: "torch.Tensor", cos: "torch.Tensor", signed_sin: "torch.Tensor") -> "torch.Tensor":
        """hidden [rows, hidden] -> the rotated fused q/k/v output [rows, qkv_out]."""
        rows = hidden.shape[0]
        qkv = hidden.new_empty((rows, self.qkv_out))
        threads = self.torch.get_num_threads()
        args = (hidden.data_ptr(), rows, cos.data_ptr(), signed_sin.data_ptr(), qkv.data_ptr(), threads)
        if self.library.serve_layer_before(self.plan_at, *args):
            raise MemoryError(f"no scratch for a layer of {rows} rows")
        return qkv

    def after(self, attended: "torch.Tensor", hidden: "torch.Tensor") -> "torch.Tensor":
        """attended [rows, heads * dim], hidden [rows, hidden] (the layer's input) -> the layer's output."""
        rows = hidden.shape[0]
        out = hidden.new_empty((rows, self.hidden))
        threads = self.torch.get_num_threads()
        args = (attended.data_ptr(), hidden.data_ptr(), rows, out.data_ptr(), threads)
        if self.library.serve_layer_after(self.plan_at, *args):
            raise MemoryError(f"no scratch for a layer of {rows} rows")
        return out


def define_operator(torch: Any) -> None:
    """``torch.ops.serve.panel_linear`` (once per process): the kernel as an operator that torch.compile keeps
    whole around the ops it fuses (COMPILE), run by the kernel loaded from the library it names."""
    if "panel_linear" in LOADED_OPERATORS:
        return

    def panel_linear(x: Any, panels: Any, bias: Any, out_features: int, library: str) -> Any:
        return LOADED[library].run(x, panels, bias, out_features)

    def shape_only(x: Any, panels: Any, bias: Any, out_features: int, library: str) -> Any:
        return x.new_empty((*x.shape[:-1], out_features), dtype=panels.dtype)

    operator = torch.library.custom_op("serve::panel_linear", panel_linear, mutates_args=(), schema=OPERATOR_SCHEMA)
    operator.register_fake(shape_only)
    LOADED_OPERATORS["panel_linear"] = operator


def declare(library: ctypes.CDLL) -> None:
    """The argument and result types of the library's functions (the bf16 ones where it has them)."""
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    linear = [pointer, size, pointer, size, size, pointer, pointer, ctypes.c_int]
    plus = [pointer, size, pointer, size, size, pointer, pointer, pointer, ctypes.c_int]  # with a residual
    library.serve_pack_panels.argtypes, library.serve_pack_panels.restype = [pointer, size, size, pointer], None
    library.serve_linear_panels.argtypes, library.serve_linear_panels.restype = plus, None
    library.serve_linear_panels_512.argtypes, library.serve_linear_panels_512.restype = plus, None
    library.serve_has_bf16.argtypes, library.serve_has_bf16.restype = [], ctypes.c_int
    threads, number = ctypes.c_int, ctypes.c_float
    library.serve_rms_norm.argtypes = [pointer, size, size, pointer, number, pointer, threads]
    library.serve_silu_mul.argtypes = [pointer, size, size, pointer, threads]
    library.serve_rope.argtypes = [pointer, size, size, size, size, pointer, pointer, threads]
    for name in ("serve_rms_norm", "serve_silu_mul", "serve_rope"):
        getattr(library, name).restype = None
    plan = ctypes.POINTER(LayerPlan)
    library.serve_layer_before.argtypes = [plan, pointer, size, pointer, pointer, pointer, threads]
    library.serve_layer_after.argtypes = [plan, pointer, pointer, size, pointer, threads]
    library.serve_layer_before.restype = library.serve_layer_after.restype = ctypes.c_int
    if library.serve_has_bf16():
        library.serve_pack_panels_bf16.argtypes = [pointer, size, size, pointer]
        library.serve_pack_panels_bf16.restype = None
        library.serve_linear_panels_bf16.argtypes = linear
        library.serve_linear_panels_bf16.restype = ctypes.c_int


def bf16_unusable_reason(library: ctypes.CDLL, flags: set[str]) -> Optional[str]:
    """Why the library's bf16 functions cannot run here (None when they can)."""
    if not library.serve_has_bf16():
        return "the compiler that built the kernel has no AVX-512 BF16 support"
    missing = BF16_NEEDS - flags
    return f"the CPU lacks {', '.join(sorted(missing))}" if missing else None


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
