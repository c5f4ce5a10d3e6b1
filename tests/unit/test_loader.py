from pathlib import Path

import pytest
import torch

from serve.config import Settings
from serve.model.loader import (
    EMBEDDED_NAME,
    ModelLoadError,
    download_from_hub,
    plan_placement,
    resolve_dtype,
    resolve_source,
)

GIB = 1024**3


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


def test_dtype_auto_is_bf16_on_cuda_fp32_on_cpu():
    assert resolve_dtype("auto", on_cuda=True) is torch.bfloat16
    assert resolve_dtype("auto", on_cuda=False) is torch.float32
    assert resolve_dtype("float16", on_cuda=False) is torch.float16


def test_placement_cpu_one_gpu_and_several():
    assert plan_placement(None, []) == {"device_map": None}
    assert plan_placement(1, [80 * GIB]) == {"device_map": {"": 0}}
    plan = plan_placement(2, [80 * GIB] * 4)
    assert plan["device_map"] == "auto" and sorted(plan["max_memory"]) == [0, 1]
    assert all(0 < budget < 80 * GIB for budget in plan["max_memory"].values())
    assert sorted(plan_placement(None, [24 * GIB] * 4)["max_memory"]) == [0, 1, 2, 3]


def test_placement_more_gpus_than_visible():
    with pytest.raises(ModelLoadError, match="SM_NUM_GPUS=4"):
        plan_placement(4, [80 * GIB])


def test_unreachable_hub_gives_a_clear_message(tmp_path):
    with pytest.raises(ModelLoadError) as caught:
        download_from_hub(settings(model_id="sagemaker-llm-serve-tests/no-such-model", model_revision="main", cache_dir=str(tmp_path)))
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
