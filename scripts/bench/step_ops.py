"""How many operations one engine step dispatches, and their host time: what a GPU pays per step in launches.

    python3 scripts/bench/step_ops.py [--layers 32] [--batches 1,32] [--chunk 128] [--reps 20] [--json PATH]

Builds the lean model with the Llama-3.1-8B layer structure (``--layers`` layers, grouped-query attention 4:1) but
tiny widths (hidden 64, vocab 512), random weights in bfloat16 (the GPU's dtype, so dtype conversions count), on the
CPU with one torch thread, over the paged KV cache; then, for a decode-only step at each batch (the static path that
a GPU captures as a CUDA graph) and for a prefill step of one ``--chunk``-token prompt chunk (the eager path of every
step that carries a prompt), reports:

- ``dispatched``: operator calls made from Python (each a trip through the dispatcher: host time on any device);
- ``kernels``: operators that compute or copy (each one kernel launch on a GPU; views and allocations excluded);
- ``host ms``: the fastest step's CPU time here in float32 (no bfloat16 emulation), where the tensors are so
  small that it is nearly all dispatch.

A GPU replays the decode step's kernels from a graph without the host, but each still costs a launch slot of
~1-2 us; an eager step pays its host time in full. The counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402

from serve.engine.kv_cache import CacheShape, PagedKVCache  # noqa: E402
from serve.engine.runner import ModelRunner  # noqa: E402
from serve.engine.types import Request, SamplingParams  # noqa: E402
from serve.engine.scheduler import StepPlan  # noqa: E402
from serve.modeling.llama import LlamaForServing  # noqa: E402

# Operators that neither compute nor copy: views, shape queries and allocations launch no kernel.
NO_KERNEL = {
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::split",
    "aten::split_with_sizes",
    "aten::chunk",
    "aten::narrow",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::transpose",
    "aten::t",
    "aten::permute",
    "aten::flatten",
    "aten::unflatten",
    "aten::alias",
    "aten::detach",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::resize_",
    "aten::result_type",
    "aten::to",
    "aten::type_as",
    "aten::contiguous",
    "aten::_reshape_alias",
    "aten::is_nonzero",
    "aten::item",
    "aten::_local_scalar_dense",
    "aten::broadcast_tensors",
    "aten::_has_compatible_shallow_copy_type",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::detach_",
}


def tiny_llama(layers: int) -> LlamaConfig:
    """Llama-3.1-8B's structure (GQA 32:8 scaled to 4:1, llama3 RoPE) at widths where compute is negligible."""
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=224,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=512,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    )


def build_runner(layers: int, max_batch: int, context: int, dtype: torch.dtype, block: int = 16) -> ModelRunner:
    torch.manual_seed(0)
    model = LlamaForServing.from_config(tiny_llama(layers), dtype=dtype)
    shape = CacheShape.of(model.config, dtype)
    blocks_each = -(-(context + 1) // block)
    cache = PagedKVCache(shape, max_batch * blocks_each + 2, block, torch.device("cpu"))
    return ModelRunner(model, cache, None, max_batch, blocks_each)


class StepSequence:
    """What ``ModelRunner.step`` reads of a sequence: a greedy request, its ids, its place in the cache."""

    def __init__(self, ids: list[int], cached: int, table: list[int]):
        self.request = Request(prompt_ids=ids, params=SamplingParams())
        self.id, self.generator, self.matcher, self.scores_prompt = self.request.id, None, None, False
        self.prefill_ids, self.all_ids, self.block_table = ids, ids, table
        self.start = cached
        self.num_cached, self.prompt_left = cached, len(ids) - cached
        self.proposal: list[int] = []  # no speculative tokens to verify
        self.images = None  # a text prompt: no image features


def engine_step(runner: ModelRunner, plan: StepPlan):
    """A closure running ``plan`` through the runner's own ``step`` (the static decode path for a decode-only plan,
    the eager path for a prompt chunk), each time from the same place in the cache."""
    sequences = plan.decode + [seq for seq, _ in plan.prefill]

    def run() -> None:
        for seq in sequences:
            seq.num_cached = seq.start
        runner.step(plan)

    return run


def decode_step(runner: ModelRunner, batch: int, context: int):
    """One decode step of ``batch`` sequences at position ``context``, each with its own blocks."""
    blocks_each = -(-(context + 1) // runner.cache.block_size)
    tables = [[1 + i * blocks_each + b for b in range(blocks_each)] for i in range(batch)]
    decode = [StepSequence([7 + i] * (context + 1), context, table) for i, table in enumerate(tables)]
    return engine_step(runner, StepPlan(decode, []))


def prefill_step(runner: ModelRunner, chunk: int):
    """One eager step over a whole ``chunk``-token prompt (its first token sampled at the end, as the engine does)."""
    seq = StepSequence([(11 * i) % 500 for i in range(chunk)], 0, list(range(1, 2 + chunk // runner.cache.block_size)))
    return engine_step(runner, StepPlan([], [(seq, chunk)]))


def count_ops(run) -> tuple[int, int]:
    """(operators dispatched from Python, those of them that launch a kernel) in one call of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run()
    events = [event for event in prof.events() if event.name.startswith("aten::")]
    top = [event for event in events if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")]
    return len(top), sum(1 for event in top if launches_kernel(event))


def launches_kernel(event) -> bool:
    """A top-level operator computes or copies (a dtype conversion copies; a view or a same-dtype ``to`` does not)."""
    if event.name not in NO_KERNEL:
        return True
    pending = list(event.cpu_children)
    while pending:
        child = pending.pop()
        if child.name == "aten::copy_":
            return True
        pending.extend(child.cpu_children)
    return False


def host_ms(run, reps: int) -> float:
    """The fastest of ``reps`` steps, in CPU time of the calling thread (one torch thread: all of the step's work). On
    a shared machine both the wall clock and the median swing by a quarter from run to run; the fastest step is the
    steadiest estimate of what dispatching the step costs."""
    with torch.inference_mode():
        for _ in range(3):
            run()
        times = []
        for _ in range(reps):
            started = time.thread_time()
            run()
            times.append(1000 * (time.thread_time() - started))
    return min(times)


def steps(args: argparse.Namespace, batches: list[int]) -> dict:
    """Each measured step by name: a function of the runner that returns the step's closure."""
    named = {f"decode batch {b}": (lambda runner, b=b: decode_step(runner, b, args.context)) for b in batches}
    named[f"prefill {args.chunk} tokens"] = lambda runner: prefill_step(runner, args.chunk)
    return named


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batches = [int(b) for b in args.batches.split(",")]
    context = max(args.context, args.chunk)
    counted, timed = (build_runner(args.layers, max(batches), context, t) for t in (torch.bfloat16, torch.float32))
    results = {}
    print(f"{args.layers} layers | dispatched | kernels | per layer | host ms")
    for name, step in steps(args, batches).items():
        dispatched, kernels = count_ops(step(counted))
        ms = host_ms(step(timed), args.reps)
        results[name] = {"dispatched": dispatched, "kernels": kernels, "host_ms": round(ms, 2)}
        print(f"{name} | {dispatched} | {kernels} | {kernels / args.layers:.1f} | {ms:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": args.layers, "steps": results}, indent=1))


if __name__ == "__main__":
    main()
