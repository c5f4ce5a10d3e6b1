from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from serve.config import Settings
from serve.loading.source import EMBEDDED_NAME, ModelLoadError, adapter_folders, download_from_hub, resolve_source
from serve.engine.types import total_token_limit
from serve.loading.loader import cpu_prefers_bf16, model_context, resolve_dtype, use_cpu_threads


def settings(**kwargs) -> Settings:
    kwargs.setdefault("model_dir", "/nonexistent-model-dir")
    return Settings(**kwargs)


def test_local_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    source = resolve_source(settings(model_id=str(tmp_path)))
    assert (source.kind, source.location) == ("local", str(tmp_path))


def test_gguf_file_path(tmp_path):
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(settings(model_id=str(gguf))).kind == "gguf"


def test_folder_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve_source(settings(model_id=str(tmp_path)))
    assert source.kind == "gguf" and source.location.endswith("m.gguf")


def test_hub_id():
    source = resolve_source(settings(model_id="HuggingFaceH4/zephyr-7b-beta"))
    assert (source.kind, source.location) == ("hub", "HuggingFaceH4/zephyr-7b-beta")


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_source(settings(model_id=str(tmp_path / "nope.gguf")))
    with pytest.raises(ModelLoadError, match="looks like a path"):
        resolve_source(settings(model_id="/no/such/folder"))


def test_sagemaker_model_dir_used_when_it_holds_a_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(settings(model_dir=str(tmp_path))).kind == "sagemaker"


def test_embedded_default_when_nothing_is_configured(tmp_path):
    source = resolve_source(settings(model_dir=str(tmp_path)))  # empty folder: not a model
    assert source.kind == "embedded" and source.name == EMBEDDED_NAME and Path(source.location).is_file()


def test_model_id_wins_over_model_dir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(settings(model_id="org/model", model_dir=str(tmp_path))).kind == "hub"


def test_dtype_auto_is_bf16_on_cuda_and_on_cpus_that_prefer_it():
    assert resolve_dtype("auto", on_cuda=True, cpu_bf16=False) is torch.bfloat16
    assert resolve_dtype("auto", on_cuda=False, cpu_bf16=True) is torch.bfloat16
    assert resolve_dtype("auto", on_cuda=False, cpu_bf16=False) is torch.float32
    assert resolve_dtype("float16", on_cuda=False) is torch.float16


def test_a_sequence_holds_the_context_capped_at_4096_unless_max_total_tokens_says():
    assert total_token_limit(32768) == 4096 and total_token_limit(2048) == 2048
    assert total_token_limit(32768, 8000) == 8000  # MAX_TOTAL_TOKENS lifts the cap
    assert total_token_limit(2048, 8000) == 2048  # but never past the model's context
    assert model_context(SimpleNamespace(max_position_embeddings=131072)) == 131072
    assert model_context(SimpleNamespace()) == model_context(SimpleNamespace(max_position_embeddings=None)) == 4096


def test_bf16_preference_is_read_from_cpu_flags():
    epyc_zen3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    sapphire_rapids = "flags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    epyc_zen4 = "flags\t\t: avx2 avx512f avx512_bf16\n"  # bf16 dot products, no AMX: packed float32 is faster
    epyc_zen5 = "flags\t\t: avx2 avx512f avx512_bf16 avx512_vp2intersect\n"  # full-width bf16: bf16 is faster
    tiger_lake = "flags\t\t: avx2 avx512f avx512_vp2intersect\n"  # no bf16 instructions at all
    graviton3 = "Features\t: fp asimd sve bf16 i8mm\n"
    assert not any(map(cpu_prefers_bf16, (epyc_zen3, epyc_zen4, tiger_lake)))
    assert all(map(cpu_prefers_bf16, (sapphire_rapids, epyc_zen5, graviton3)))


def test_unreachable_hub_gives_a_clear_message(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        download_from_hub(
            settings(model_id="sagemaker-llm-serve-tests/no-such-model", model_revision="main", cache_dir=str(tmp_path))
        )
    message = str(caught.value)
    assert "HF_MODEL_ID='sagemaker-llm-serve-tests/no-such-model'" in message and "/opt/ml/model" in message


def test_converted_gguf_folder_is_a_plain_transformers_folder(embedded_folder):
    """vLLM and `transformers serve` read this folder too: it names its architecture and stores the embedding."""
    import json

    from safetensors import safe_open

    config = json.loads((embedded_folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    with safe_open(str(embedded_folder / "model.safetensors"), "pt") as weights:
        assert "model.embed_tokens.weight" in weights.keys()


def test_adapter_folders_from_the_model_dir_and_lora_adapters(tmp_path):
    for name in ("b-sql", "a-chat"):
        (tmp_path / "model" / "adapters" / name).mkdir(parents=True)
        (tmp_path / "model" / "adapters" / name / "adapter_config.json").write_text("{}")
    (tmp_path / "model" / "adapters" / "notes").mkdir()  # no adapter_config.json: not an adapter
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "adapter_config.json").write_text("{}")
    found = adapter_folders(
        settings(model_dir=str(tmp_path / "model"), lora_adapters=(("extra", str(tmp_path / "extra")),))
    )
    assert list(found) == ["a-chat", "b-sql", "extra"] and found["extra"] == tmp_path / "extra"
    with pytest.raises(ModelLoadError, match="LORA_ADAPTERS: adapter 'gone' at /nowhere has no adapter_config.json"):
        adapter_folders(settings(lora_adapters=(("gone", "/nowhere"),)))


def threads_set_on_a_thread(requested, cores):
    """use_cpu_threads on a fresh thread, as the engine calls it on its own; (returned, what torch then reports)."""
    import threading

    seen = {}

    def engine_thread():
        seen["set"] = use_cpu_threads(requested, cores)
        seen["torch"] = torch.get_num_threads()

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    return seen["set"], seen["torch"]


def test_the_engine_computes_on_every_core_unless_told():
    assert threads_set_on_a_thread(None, cores=4) == (4, 4)
    assert threads_set_on_a_thread(None, cores=1) == (1, 1)
    assert threads_set_on_a_thread(2, cores=4) == (2, 2)  # TORCH_THREADS
