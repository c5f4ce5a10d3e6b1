"""Runs the Triton paged decode kernel over the fp8 steps a test saved (``python -m tests.unit.kv_fp8_triton IN
OUT`` under TRITON_INTERPRET=1): a fresh process, since Triton reads TRITON_INTERPRET when first imported; it
imports only torch and the kernel, to start fast."""

from __future__ import annotations

import sys

import torch

from serve.engine.paged_triton import paged_decode


def main(inputs: str, outputs: str) -> None:
    steps = torch.load(inputs)
    results = {}
    for name, step in steps.items():
        both = step["scales"]
        scales = (both[0:1], both[1:2])  # views of one tensor, as PagedKVCache.layer_scales hands them
        args = (step["query"], step["keys"], step["values"], step["tables"], step["lengths"], step["scale"])
        results[name] = paged_decode(*args, scales)
    torch.save(results, outputs)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
