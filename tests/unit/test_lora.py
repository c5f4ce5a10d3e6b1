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
