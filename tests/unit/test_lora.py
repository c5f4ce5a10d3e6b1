"""LoRA adapters in the engine: each request's tokens get its own adapter, and greedy output equals peft's merged
model."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from serve.wiring import single_engine
from serve.engine import Request, SamplingParams
from serve.engine.lora import AdapterError, read_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 504, 3458, 282, 4649, 314], [1, 9556, 2492, 253, 655], [1, 378, 2365, 282]]
NEW_TOKENS = 12


def make_adapter(base_dir: Path, target: Path, seed: int, rank: int = 8, rslora: bool = False) -> Path:
    """A peft LoRA with random A and B (peft's default B = 0 would change nothing), saved as peft saves it."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False, use_rslora=rslora)
    get_peft_model(base, config).save_pretrained(target)
    return target


def merged_greedy(base_dir: Path, adapter: Path, prompt: list[int]) -> list[int]:
    """peft's own answer: the adapter merged into the weights, then transformers' greedy generate."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload() if adapter else base
    output = merged.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )
    return output[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "sql": make_adapter(tiny_model_dir, root / "sql", seed=1),
        "chat": make_adapter(tiny_model_dir, root / "chat", seed=2, rank=4, rslora=True),
    }


@pytest.fixture(scope="module")
def lora_engine(tiny_settings, adapters):
    pairs = tuple((name, str(path)) for name, path in adapters.items())
    settings = replace(tiny_settings, lora_adapters=pairs, dtype="float32", max_concurrent_requests=16)
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    yield engine
    engine.stop()


def greedy(adapter=None, prompt=PROMPTS[0]) -> Request:
    return Request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True), adapter=adapter)


def tokens(stream) -> list[int]:
    return [event.token_id for event in stream if event.token_id is not None]


def test_adapters_match_peft_merged_model_and_differ_from_base(lora_engine, tiny_model_dir, adapters):
    assert lora_engine.loaded.adapters == ("sql", "chat")
    assert lora_engine.loaded.model.serve_lora.numbers == {"sql": 1, "chat": 2}  # install numbers, in load order
    base = tokens(lora_engine.submit(greedy()))
    assert base == merged_greedy(tiny_model_dir, None, PROMPTS[0])
    for name, folder in adapters.items():
        ours = tokens(lora_engine.submit(greedy(name)))
        assert ours == merged_greedy(tiny_model_dir, folder, PROMPTS[0]), name
        assert ours != base, f"adapter {name} changed nothing"


def test_a_mixed_batch_gives_each_request_its_own_adapter(lora_engine, tiny_model_dir, adapters):
    cases = [(adapter, prompt) for prompt in PROMPTS for adapter in (None, "sql", "chat")]
    streams = [lora_engine.submit(greedy(adapter, prompt)) for adapter, prompt in cases]  # admitted together: one batch
    results = [tokens(stream) for stream in streams]
    for (adapter, prompt), result in zip(cases, results):
        assert result == merged_greedy(tiny_model_dir, adapters.get(adapter), prompt), (adapter, prompt)


def test_unsupported_adapters_are_refused_by_name(tmp_path, tiny_model_dir):
    folder = make_adapter(tiny_model_dir, tmp_path / "dora", seed=3)
    config = (folder / "adapter_config.json").read_text().replace('"use_dora": false', '"use_dora": true')
    (folder / "adapter_config.json").write_text(config)
    with pytest.raises(AdapterError, match="adapter 'dora': use_dora=True is not supported"):
        read_adapter("dora", folder)
    with pytest.raises(AdapterError, match="adapter 'none'.*needs adapter_config.json"):
        read_adapter("none", tmp_path)


MODULE = "base_model.model.model.layers.0.self_attn.o_proj"


def write_adapter(folder: Path, config: str, tensors: dict[str, torch.Tensor]) -> Path:
    """A peft-shaped folder with exactly the config text and tensors given (however wrong)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(config)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def lora_pair(rank_a: int = 8, rank_b: int = 8, width: int = 64) -> dict[str, torch.Tensor]:
    return {f"{MODULE}.lora_A.weight": torch.ones(rank_a, width), f"{MODULE}.lora_B.weight": torch.ones(width, rank_b)}


@pytest.mark.parametrize(
    "config, message",
    [
        ('{"r": "abc"}', "r must be a positive integer, not 'abc'"),
        ('{"r": 0}', "r must be a positive integer, not 0"),
        ('{"r": -8}', "r must be a positive integer, not -8"),
        ('{"r": 1e400}', "r must be a positive integer, not inf"),
        ('{"r": true}', "r must be a positive integer, not True"),
        ('{"r": 8, "lora_alpha": []}', "lora_alpha must be a finite number above 0, not []"),
        ('{"r": 8, "lora_alpha": NaN}', "lora_alpha must be a finite number above 0, not nan"),
        ('{"r": 8, "use_rslora": "yes"}', "use_rslora must be true or false"),
        ("[8]", "adapter_config.json must hold a JSON object, not a list"),
        ('"LORA"', "adapter_config.json must hold a JSON object, not a str"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON: nested too deeply"),
    ],
)
def test_every_config_field_is_checked_and_named(tmp_path, config, message):
    folder = write_adapter(tmp_path / "bad", config, lora_pair())
    with pytest.raises(AdapterError) as caught:
        read_adapter("bad", folder, max_rank=64)
    assert message in str(caught.value) and str(caught.value).startswith("adapter 'bad'")


@pytest.mark.parametrize(
    "tensors, message",
    [
        (lora_pair(rank_a=8, rank_b=16), "both must have rank r=8"),
        (lora_pair(rank_a=4, rank_b=4), "both must have rank r=8"),
        ({f"{MODULE}.lora_A.weight": torch.ones(8, 64), f"{MODULE}.lora_B.weight": torch.ones(64)}, "2-D matrix"),
        ({**lora_pair(), f"{MODULE}.lora_A.weight": torch.ones(8, 64, dtype=torch.int32)}, "floating-point"),
        ({**lora_pair(), f"{MODULE}.lora_A.weight": torch.full((8, 64), float("nan"))}, "not finite"),
        ({f"{MODULE}.lora_B.weight": torch.ones(64, 8)}, "has no matching lora_A weight"),
    ],
)
def test_every_tensor_shape_is_checked_before_linking(tmp_path, tensors, message):
    folder = write_adapter(tmp_path / "bad", '{"r": 8, "lora_alpha": 16}', tensors)
    with pytest.raises(AdapterError, match=message):
        read_adapter("bad", folder, max_rank=64)


def _huge_adapter(tiny_model_dir: Path, folder: Path) -> Path:
    """An adapter of finite weights whose deltas overflow float32: its logits come out NaN."""
    from safetensors.torch import load_file, save_file

    make_adapter(tiny_model_dir, folder, seed=9)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    huge = {key: torch.ones_like(value) * (1e37 if ".lora_B." in key else 1.0) for key, value in tensors.items()}
    save_file(huge, str(folder / "adapter_model.safetensors"))
    return folder


def test_non_finite_logits_end_only_their_own_request(lora_engine, tiny_model_dir, tmp_path):
    from serve.engine.lora import AdapterWeights

    modules = read_adapter("huge", _huge_adapter(tiny_model_dir, tmp_path / "huge"), max_rank=64)
    lora_engine.install_adapter("huge", AdapterWeights(99, modules)).result(60)
    with_logprobs = Request(PROMPTS[1], SamplingParams(max_new_tokens=4, logprobs=2), adapter="huge")
    streams = [lora_engine.submit(greedy()), lora_engine.submit(greedy("huge")), lora_engine.submit(with_logprobs)]
    base, *broken = [list(stream) for stream in streams]
    assert tokens(base) == merged_greedy(tiny_model_dir, None, PROMPTS[0])  # its batch neighbours changed nothing
    for events in broken:
        assert tokens(events) == [] and len(events) == 1
        assert events[0].finish_reason.value == "error" and "not finite (NaN or infinity)" in events[0].error
        assert "'huge'" in events[0].error
    lora_engine.retire_adapter("huge").result(60)
    lora = lora_engine.loaded.model.serve_lora
    assert "huge" not in lora.names and all(99 not in layer.adapters for layer in lora.layers.values())
