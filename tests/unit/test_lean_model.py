"""The lean Llama-family model (serve/modeling/): greedy tokens through our Engine equal transformers' generate for
each family, LoRA through fused projections equals peft's merged model, and the loader picks it only where it can."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from serve.wiring import single_engine
from serve.config import Settings, load_settings
from serve.engine import Engine, EngineConfig, Request, SamplingParams
from serve.loading.loader import LoadedModel, load_model
from serve.modeling import LlamaForServing

NEW_TOKENS = 10
TEXTS = [
    "The quick brown fox",
    "Hello",
    "def fibonacci(n):\n    if n <",
    "Once upon a time in a land far, far away, there",
]
SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
YARN_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES = {
    "llama3-rope-scaling": lambda vocab: LlamaConfig(
        vocab_size=vocab, rope_parameters=LLAMA3_ROPE, head_dim=32, **SHAPE
    ),
    "llama-tied": lambda vocab: LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, attention_bias=True, **SHAPE),
    "mistral": lambda vocab: MistralConfig(vocab_size=vocab, sliding_window=None, **SHAPE),
    "qwen2-yarn": lambda vocab: Qwen2Config(vocab_size=vocab, rope_parameters=YARN_ROPE, **SHAPE),
    "qwen3": lambda vocab: Qwen3Config(vocab_size=vocab, head_dim=24, **SHAPE),
}


def save_random_model(config, folder: Path, tokenizer, seed: int = 0) -> Path:
    """A random transformers model of ``config``, saved with the embedded tokenizer (ids the engine can detokenize)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random norms and biases too, so a misplaced norm or bias cannot go unnoticed
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                parameter.normal_(1.0 if "norm" in name else 0.0, 0.2)
            elif ".q_proj." in name or ".k_proj." in name:  # sharp attention, so positions (RoPE) change the tokens
                parameter.normal_(0.0, 0.4)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def generate(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy generate, through end-of-sequence tokens like ``ignore_eos`` (min_new_tokens would
    forbid them instead)."""
    with torch.inference_mode():
        output = model.generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return output[0, len(prompt) :].tolist()


def hf_greedy(folder: Path, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    return generate(AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval(), prompt, new_tokens)


def engine_greedy(
    settings: Settings, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, adapter=None
) -> tuple[type, list[list[int]]]:
    """(model class the loader chose, greedy tokens of every prompt submitted together: one continuous batch)."""
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(120), engine.load_error
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        streams = [engine.submit(Request(prompt, params, adapter=adapter)) for prompt in prompts]
        results = [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
        return type(engine.loaded.model), results
    finally:
        engine.stop()


def settings_for(folder: Path, **overrides) -> Settings:
    base = Settings(
        model_id=str(folder),
        model_dir="/nonexistent",
        dtype="float32",
        max_concurrent_requests=8,
        max_batch_prefill_tokens=16,
    )
    return replace(base, **overrides)


@pytest.fixture(scope="module")
def tokenizer(embedded_folder):
    return AutoTokenizer.from_pretrained(str(embedded_folder))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_generate(family, tokenizer, tmp_path):
    folder = save_random_model(FAMILIES[family](len(tokenizer)), tmp_path / family, tokenizer)
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS]
    chosen, ours = engine_greedy(settings_for(folder), prompts)
    assert chosen is LlamaForServing
    assert ours == [hf_greedy(folder, prompt) for prompt in prompts]


def test_the_loader_keeps_transformers_for_other_architectures_and_when_turned_off(tokenizer, tmp_path, tiny_model_dir):
    gemma = GemmaConfig(vocab_size=len(tokenizer), head_dim=16, **SHAPE)
    folder = save_random_model(gemma, tmp_path / "gemma", tokenizer)
    assert type(load_model(settings_for(folder)).model).__name__ == "GemmaForCausalLM"
    assert type(load_model(settings_for(tiny_model_dir)).model) is LlamaForServing
    assert type(load_model(settings_for(tiny_model_dir, lean_model=False)).model).__name__ == "LlamaForCausalLM"
    assert load_settings({"LEAN_MODEL": "false"}).lean_model is False and load_settings({}).lean_model is True


def test_a_checkpoint_that_does_not_fit_falls_back_to_transformers(tokenizer, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    folder = save_random_model(FAMILIES["mistral"](len(tokenizer)), tmp_path / "odd", tokenizer)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.extra_gate.weight"] = torch.ones(4)  # a variant the lean model does not know
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("INFO", logger="serve.loading.loader"):
        loaded = load_model(settings_for(folder))
    assert type(loaded.model).__name__ == "MistralForCausalLM"
    assert "unexpected tensor model.layers.0.self_attn.extra_gate.weight" in caplog.text


def test_dummy_weights_from_config_serve_through_the_engine(tokenizer):
    config = FAMILIES["qwen3"](len(tokenizer))
    torch.manual_seed(0)
    model = LlamaForServing.from_config(config, "cpu", torch.float32)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.weight.shape == (4 * 24 + 2 * 2 * 24, 64) and set(qkv.parts) == {"q_proj", "k_proj", "v_proj"}
    assert abs(float(qkv.weight.std()) - config.initializer_range) < 0.005 and bool(
        (model.model.norm.weight == 1).all()
    )
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # Qwen3Config does not tie by default
    assert model.generation_config is not None and model.device.type == "cpu" and model.dtype == torch.float32
    loaded = LoadedModel(model, tokenizer, "dummy", model.device, model.dtype, 512)
    engine = Engine(load=lambda: loaded, config=EngineConfig(max_concurrent_requests=2)).start()
    try:
        assert engine.wait_ready(60), engine.load_error
        stream = engine.submit(
            Request(tokenizer("Hello")["input_ids"], SamplingParams(max_new_tokens=6, ignore_eos=True))
        )
        events = list(stream)
    finally:
        engine.stop()
    assert events[-1].generated_tokens == 6 and events[-1].error is None


def save_adapters(model_dir: Path, folder: Path, targets_per_adapter: tuple[list[str], ...]) -> dict[str, Path]:
    """Random LoRA adapters (rank 4) of the model in ``model_dir``, adapter ``a<n>`` on the n-th list of targets."""
    from peft import LoraConfig, get_peft_model

    folders = {}
    for seed, targets in enumerate(targets_per_adapter, 1):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        folders[f"a{seed}"] = folder / f"a{seed}"
        get_peft_model(base, config).save_pretrained(folders[f"a{seed}"])
    return folders


def test_lora_on_fused_projections_equals_peft_merged_model(tiny_model_dir, tokenizer, tmp_path):
    """Adapters on q_proj, v_proj and gate_proj only: each delta lands on its part of qkv_proj / gate_up_proj."""
    from peft import PeftModel

    folders = save_adapters(
        tiny_model_dir, tmp_path, (["q_proj", "v_proj", "gate_proj"], ["k_proj", "up_proj", "o_proj"])
    )
    settings = settings_for(tiny_model_dir, lora_adapters=tuple((name, str(path)) for name, path in folders.items()))
    prompts = [tokenizer(text)["input_ids"] for text in TEXTS[:2]]
    engine = single_engine(settings).start()
    try:
        assert engine.wait_ready(120), engine.load_error
        assert isinstance(engine.loaded.model, LlamaForServing)
        params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        cases = [(adapter, prompt) for prompt in prompts for adapter in (None, "a1", "a2")]
        streams = [engine.submit(Request(prompt, params, adapter=adapter)) for adapter, prompt in cases]  # one batch
        ours = [[event.token_id for event in stream if event.token_id is not None] for stream in streams]
    finally:
        engine.stop()
    for (adapter, prompt), tokens in zip(cases, ours):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, folders[adapter]).merge_and_unload() if adapter else base
        assert tokens == generate(model, prompt), (adapter, prompt)
    assert ours[0] != ours[1] and ours[0] != ours[2], "an adapter changed nothing"


SMOL_PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def add(a, b):",
    "Photosynthesis is the process",
    "List three primary colors:",
    "Translate to French: good night",
    "2 + 2 =",
    "The best way to learn a language is",
    "Once upon a time",
    "What is machine learning?",
    "import torch\n",
    "My favourite food is",
    "Explain gravity to a child.",
    "SELECT name FROM",
    "The moon orbits",
    "Dear Sir or Madam,",
    "In 1969,",
    "Water boils at",
    "A good password has",
    "The three laws of motion are",
]


@pytest.mark.slow
def test_embedded_smollm2_lean_equals_transformers_generate(embedded_folder, tokenizer):
    """The real embedded model (float32): 20 prompts served together by the lean model = HF generate one by one."""
    prompts = [tokenizer(text)["input_ids"] for text in SMOL_PROMPTS]
    settings = settings_for(embedded_folder, max_concurrent_requests=32, max_batch_prefill_tokens=64)
    chosen, ours = engine_greedy(settings, prompts, new_tokens=16)
    assert chosen is LlamaForServing
    reference = AutoModelForCausalLM.from_pretrained(str(embedded_folder), dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, ours):
        assert tokens == generate(reference, prompt, 16), tokenizer.decode(prompt)


def test_settings_the_lean_model_cannot_honour_fall_back_with_a_reason(tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    from serve.loading.source import ModelSource
    from serve.loading.loader import PreparedModel, lean_fallback_reason
    from serve.loading.placement import EnginePlacement, footprint, plan_placement
    from serve.loading.quantize import Quantization

    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    cpu = plan_placement("auto", 0, [], footprint(config, 4, 4), 1024)
    prepared = PreparedModel(
        ModelSource("local", str(tiny_model_dir), "tiny"), tiny_model_dir, torch.float32, Quantization(), cpu
    )
    settings, one = Settings(), cpu.engines[0]
    assert lean_fallback_reason(prepared, settings, one, config) is None
    quantized = replace(prepared, quantization=Quantization("gptq (pre-quantized)", {}, 0.5))
    assert "quantization gptq" in lean_fallback_reason(quantized, settings, one, config)
    split = EnginePlacement(("cuda:0", "cuda:1"), "auto")
    assert "split over 2 devices" in lean_fallback_reason(prepared, settings, split, config)
    config.auto_map = {"AutoModelForCausalLM": "custom.Model"}
    assert "own model code" in lean_fallback_reason(prepared, replace(settings, trust_remote_code=True), one, config)
    assert lean_fallback_reason(prepared, settings, one, config) is None  # its code is not run without trust
    assert "safetensors" in lean_fallback_reason(replace(prepared, folder=tmp_path), settings, one, config)
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    assert "rope type 'dynamic'" in lean_fallback_reason(prepared, settings, one, config)
