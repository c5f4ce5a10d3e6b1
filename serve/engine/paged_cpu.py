"""Paged decode attention on the CPU (``paged_cpu.c``): reads K/V where they lie in the block pool, no gather;
float32 and bfloat16 caches, and fp8 ones (KV_CACHE_DTYPE=fp8: float8 e4m3 bytes times the layer's scales).

The library is found or built by serve.engine.native_build: beside this file (the image builds it there), else in
``<cache_dir>/kernels``, compiled there at first use (~0.5 s). Where it cannot be used (not x86-64 with AVX2 and
FMA, no library and no compiler, a failed build) ``load_paged_kernel`` says why and the caller keeps the gather.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from serve.engine.native_build import avx2_unusable, find_or_build

SOURCE = Path(__file__).with_name("paged_cpu.c")
DTYPES = (torch.float32, torch.bfloat16)  # of the query (and of a cache that is not fp8)
KV_F32, KV_BF16, KV_FP8 = 0, 1, 2  # what the cache holds, as paged_cpu.c names it


class CpuPagedKernel:
    """The compiled kernel: ``decode`` one token per sequence over the paged cache, float32, bfloat16 or fp8."""

    def __init__(self, path: Path):
        self.path = path
        self.library = ctypes.CDLL(str(path))
        pointer, size = ctypes.c_void_p, ctypes.c_int64
        number, flag = ctypes.c_float, ctypes.c_int
        self.library.serve_paged_decode.argtypes = (
            [pointer] * 6 + [size] * 7 + [number, flag, flag] + [number] * 2 + [flag]
        )
        self.library.serve_paged_decode.restype = None

    def decode(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        tables: torch.Tensor,
        lengths: torch.Tensor,
        scale: float,
        kv_scales: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> torch.Tensor:
        """query [batch, heads, dim], keys/values [blocks, block_size, kv_heads, dim] (contiguous, the query's
        dtype, or fp8 with ``kv_scales``: the key and value scales; dim a multiple of 8), tables [batch, width] of
        block ids, lengths [batch] -> [batch, heads, dim]."""
        batch, heads, dim = query.shape
        kind = KV_FP8 if kv_scales is not None else KV_BF16 if keys.dtype == torch.bfloat16 else KV_F32
        same = kind == KV_FP8 or query.dtype == keys.dtype
        if query.dtype not in DTYPES or not same or not keys.is_contiguous() or dim % 8:
            raise ValueError(f"the CPU paged kernel cannot take a {keys.dtype} cache of head dim {dim} as given")
        key_scale, value_scale = (float(kv_scales[0]), float(kv_scales[1])) if kv_scales is not None else (1.0, 1.0)
        _, block_size, kv_heads, _ = keys.shape
        if query.stride(2) != 1 or query.stride(1) != dim:  # a step's queries: heads contiguous, tokens apart
            query = query.contiguous()
        tables = tables.to(torch.int64).contiguous()
        lengths = lengths.to(torch.int64).contiguous()
        out = query.new_empty(query.shape)
        self.library.serve_paged_decode(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), tables.data_ptr(), lengths.data_ptr(),
            out.data_ptr(), batch, heads, kv_heads, dim, block_size, tables.shape[1], query.stride(0), scale,
            int(query.dtype == torch.bfloat16), kind, key_scale, value_scale, torch.get_num_threads(),
        )  # fmt: skip
        return out


@functools.lru_cache(maxsize=None)
def load_paged_kernel(cache_dir: str, c_compiler: Optional[str] = None) -> tuple[Optional[CpuPagedKernel], str]:
    """(the kernel, "") or (None, why not)."""
    reason = avx2_unusable()
    if reason:
        return None, reason
    try:
        path = find_or_build(SOURCE, [SOURCE.parent, Path(cache_dir).expanduser() / "kernels"], c_compiler)
        return CpuPagedKernel(path), ""
    except (OSError, ValueError) as exc:
        return None, f"the CPU paged kernel could not be built or loaded: {str(exc).strip()[-300:]}"
