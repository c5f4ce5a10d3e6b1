"""The placement plan on simulated GPU inventories: 1/2/4/8 GPUs of 24/40/80 GiB; 1B, 7B and 70B models."""

from types import SimpleNamespace

import pytest

from serve.loading.placement import (
    MIN_CACHE_SLOTS,
    PlacementError,
    Sharding,
    footprint,
    parameter_count,
    plan_placement,
    visible_devices,
)
from serve.modeling.parallel import shard_sizes

GIB = 1024**3
LLAMA_1B = SimpleNamespace(  # Llama-3.2-1B
    hidden_size=2048,
    num_hidden_layers=16,
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    intermediate_size=8192,
    tie_word_embeddings=True,
)
MISTRAL_7B = SimpleNamespace(
    hidden_size=4096,
    num_hidden_layers=32,
    vocab_size=32000,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=14336,
    tie_word_embeddings=False,
)
LLAMA_70B = SimpleNamespace(  # Llama-3-70B
    hidden_size=8192,
    num_hidden_layers=80,
    vocab_size=128256,
    num_attention_heads=64,
    num_key_value_heads=8,
    intermediate_size=28672,
    tie_word_embeddings=False,
)
MODELS = {"1B": LLAMA_1B, "7B": MISTRAL_7B, "70B": LLAMA_70B}
CACHE_TOKENS = MIN_CACHE_SLOTS * 4096

# (model, gpus, GiB per GPU) -> expected mode, or None when it cannot fit at all (bf16 weights and cache)
EXPECTED = {
    **{(model, gpus, size): "replicas" for model in ("1B", "7B") for gpus in (1, 2, 4, 8) for size in (24, 40, 80)},
    ("70B", 1, 24): None,
    ("70B", 1, 40): None,
    ("70B", 1, 80): None,
    ("70B", 2, 24): None,
    ("70B", 2, 40): None,
    ("70B", 2, 80): "shard",
    ("70B", 4, 24): None,
    ("70B", 4, 40): "shard",
    ("70B", 4, 80): "shard",
    ("70B", 8, 24): "shard",
    ("70B", 8, 40): "shard",
    ("70B", 8, 80): "shard",
}


def test_parameter_counts_match_the_published_sizes():
    assert round(parameter_count(LLAMA_1B) / 1e9, 2) == 1.24
    assert round(parameter_count(MISTRAL_7B) / 1e9, 2) == 7.24
    assert round(parameter_count(LLAMA_70B) / 1e9, 1) == 70.6
    assert footprint(MISTRAL_7B, 2, 2).cache_bytes_per_token == 32 * 2 * 8 * 128 * 2


@pytest.mark.parametrize("model, gpus, size", sorted(EXPECTED))
def test_auto_placement_on_simulated_inventories(model, gpus, size):
    need = footprint(MODELS[model], 2, 2)
    expected = EXPECTED[(model, gpus, size)]
    if expected is None:
        with pytest.raises(PlacementError, match="HF_MODEL_QUANTIZE"):
            plan_placement("auto", None, [size * GIB] * gpus, need, CACHE_TOKENS)
        return
    plan = plan_placement("auto", None, [size * GIB] * gpus, need, CACHE_TOKENS)
    assert plan.mode == expected and plan.devices == tuple(f"cuda:{i}" for i in range(gpus))
    if expected == "replicas":
        assert [engine.device_map for engine in plan.engines] == [{"": i} for i in range(gpus)]
        assert "fits one GPU" in plan.reason
    else:
        (engine,) = plan.engines
        assert engine.device_map == "auto" and sorted(engine.max_memory) == list(range(gpus))
        assert all(budget < size * GIB for budget in engine.max_memory.values())
        assert "does not fit one GPU" in plan.reason


def test_a_large_kv_cache_turns_a_fitting_model_into_a_shard():
    need = footprint(MISTRAL_7B, 2, 2)  # 13.5 GiB of weights, 128 KiB per cached token
    assert plan_placement("auto", None, [24 * GIB] * 2, need, 16_384).mode == "replicas"
    plan = plan_placement("auto", None, [24 * GIB] * 2, need, 100_000)  # + 12.2 GiB of cache
    assert plan.mode == "shard" and "12.2 GiB of KV cache" in plan.reason


def test_a_4bit_70b_fits_one_80gb_gpu():
    assert plan_placement("auto", None, [80 * GIB], footprint(LLAMA_70B, 0.5, 2), CACHE_TOKENS).mode == "replicas"


def test_explicit_modes_and_sm_num_gpus():
    small = footprint(LLAMA_1B, 2, 2)
    shard = plan_placement("shard", 2, [80 * GIB] * 8, small, CACHE_TOKENS)
    assert shard.mode == "shard" and sorted(shard.engines[0].max_memory) == [0, 1]
    assert plan_placement("shard", 1, [80 * GIB] * 8, small, CACHE_TOKENS).engines[0].device_map == {"": 0}
    assert len(plan_placement("replicas", 4, [40 * GIB] * 8, small, CACHE_TOKENS).engines) == 4
    assert len(plan_placement("auto", None, [40 * GIB] * 4, small, CACHE_TOKENS, replicas=2).engines) == 2
    with pytest.raises(PlacementError, match="PLACEMENT=replicas: one copy needs"):
        plan_placement("replicas", None, [80 * GIB] * 8, footprint(LLAMA_70B, 2, 2), CACHE_TOKENS)
    with pytest.raises(PlacementError, match="SM_NUM_GPUS=4 but only 1 GPU"):
        plan_placement("auto", 4, [80 * GIB], small, CACHE_TOKENS)
    with pytest.raises(PlacementError, match="REPLICAS=3 needs 3 GPUs"):
        plan_placement("replicas", 2, [80 * GIB] * 2, small, CACHE_TOKENS, replicas=3)


def test_cpu_plans():
    small = footprint(LLAMA_1B, 4, 4)
    single = plan_placement("auto", None, [], small, CACHE_TOKENS)
    assert single.mode == "replicas" and single.devices == ("cpu",) and len(single.engines) == 1
    assert single.engines[0].from_pretrained_kwargs() == {}
    assert len(plan_placement("replicas", None, [], small, CACHE_TOKENS, replicas=2).engines) == 2
    assert "nothing to split over" in plan_placement("shard", None, [], small, CACHE_TOKENS).reason


def sharding_of(config) -> Sharding:
    """The rank counts the lean model can split ``config`` over (as serve.loading.tensor_parallel finds them)."""
    return Sharding(shard_sizes(config, 16))


@pytest.mark.parametrize(
    "model, gpus, size, expected",
    [
        ("7B", 8, 80, ("replicas", 8, 1)),  # fits one GPU: a copy per GPU
        ("70B", 8, 80, ("tensor-parallel", 4, 2)),  # 131 GiB + cache: two ranks of 80 GiB hold it, four copies
        ("70B", 8, 40, ("tensor-parallel", 2, 4)),
        ("70B", 8, 24, ("tensor-parallel", 1, 8)),
        ("70B", 4, 40, ("tensor-parallel", 1, 4)),
    ],
)
def test_auto_picks_the_smallest_tensor_parallel_size_that_fits_then_copies(model, gpus, size, expected):
    config = MODELS[model]
    plan = plan_placement(
        "auto", None, [size * GIB] * gpus, footprint(config, 2, 2), CACHE_TOKENS, sharding=sharding_of(config)
    )
    assert (plan.mode, len(plan.engines), plan.engines[0].tensor_parallel) == expected
    assert len({device for engine in plan.engines for device in engine.devices}) == len(plan.engines) * expected[2]
    assert plan.describe()["tensor_parallel_size"] == expected[2]


def test_an_architecture_the_lean_model_cannot_split_keeps_accelerates_split_and_says_why():
    need = footprint(LLAMA_70B, 2, 2)
    cannot = Sharding(why_not="model type 'gemma2' has no lean model")
    plan = plan_placement("auto", None, [80 * GIB] * 8, need, CACHE_TOKENS, sharding=cannot)
    assert plan.mode == "shard" and "gemma2" in plan.reason
    with pytest.raises(PlacementError, match="cannot split this model: model type 'gemma2'"):
        plan_placement("auto", None, [80 * GIB] * 8, need, CACHE_TOKENS, tensor_parallel=8, sharding=cannot)


def test_an_explicit_tensor_parallel_size_is_checked_against_the_model_and_the_gpus():
    need, sharding = footprint(LLAMA_70B, 2, 2), sharding_of(LLAMA_70B)
    plan = plan_placement("auto", None, [80 * GIB] * 8, need, CACHE_TOKENS, tensor_parallel=8, sharding=sharding)
    assert [engine.devices for engine in plan.engines] == [tuple(f"cuda:{i}" for i in range(8))]
    with pytest.raises(PlacementError, match="do not divide over 3 ranks"):
        plan_placement("auto", None, [80 * GIB] * 8, need, CACHE_TOKENS, tensor_parallel=3, sharding=sharding)
    with pytest.raises(PlacementError, match="needs 16 GPUs"):
        plan_placement("auto", None, [80 * GIB] * 8, need, CACHE_TOKENS, tensor_parallel=16, sharding=sharding)
    with pytest.raises(PlacementError, match="each of 2 GPUs would need"):
        plan_placement("auto", None, [40 * GIB] * 8, need, CACHE_TOKENS, tensor_parallel=2, sharding=sharding)
    on_cpu = plan_placement("auto", None, [], need, CACHE_TOKENS, tensor_parallel=2, sharding=sharding)
    assert (on_cpu.mode, on_cpu.engines[0].tensor_parallel, on_cpu.engines[0].devices) == (
        "tensor-parallel",
        2,
        ("cpu",),
    )


def test_each_engine_process_is_given_only_its_own_gpus():
    """8 GPUs, TP=2: four engine processes, each seeing two GPUs as cuda:0 and cuda:1."""
    plan = plan_placement(
        "auto",
        None,
        [80 * GIB] * 8,
        footprint(LLAMA_70B, 2, 2),
        CACHE_TOKENS,
        tensor_parallel=2,
        sharding=sharding_of(LLAMA_70B),
    )
    assert [visible_devices(engine, None) for engine in plan.engines] == ["0,1", "2,3", "4,5", "6,7"]
    server_sees = "7,6,5,4,3,2,1,0"  # the server's own CUDA_VISIBLE_DEVICES: ordinals index into it
    assert [visible_devices(engine, server_sees) for engine in plan.engines] == ["7,6", "5,4", "3,2", "1,0"]
    inside = [engine.as_seen_inside() for engine in plan.engines]
    assert {engine.devices for engine in inside} == {("cuda:0", "cuda:1")}
    assert all(engine.tensor_parallel == 2 for engine in inside)
    replica = plan_placement("replicas", None, [80 * GIB] * 8, footprint(MISTRAL_7B, 2, 2), CACHE_TOKENS).engines[3]
    assert visible_devices(replica, None) == "3"
    assert (replica.as_seen_inside().devices, replica.as_seen_inside().device_map) == (("cuda:0",), {"": 0})
    assert (
        visible_devices(plan_placement("auto", None, [], footprint(MISTRAL_7B, 2, 2), CACHE_TOKENS).engines[0], None)
        is None
    )
