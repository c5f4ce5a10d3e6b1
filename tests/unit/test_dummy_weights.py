"""HF_MODEL_LOAD_FORMAT=dummy and scripts/gpu/dummy_model.py: random weights from config.json, on CPU, tiny shape."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from serve.app import create_app
from serve.wiring import single_engine
from serve.config import Settings, SettingsError, load_settings
from serve.loading.loader import load_model
from tests.helpers import TINY_KV_TOKENS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts" / "gpu"))

from dummy_model import SHAPES, write_folder  # noqa: E402


def dummy_settings(folder: Path, **kwargs) -> Settings:
    return Settings(model_id=str(folder), model_dir="/nonexistent", load_format="dummy", **kwargs)


@pytest.fixture(scope="module")
def tiny_dummy(tmp_path_factory, embedded_folder) -> Path:
    return write_folder(tmp_path_factory.mktemp("dummy-tiny"), "tiny", embedded_folder)


def test_load_format_setting():
    assert load_settings({}).load_format == "auto"
    assert load_settings({"HF_MODEL_LOAD_FORMAT": "Dummy"}).load_format == "dummy"
    with pytest.raises(SettingsError, match="HF_MODEL_LOAD_FORMAT"):
        load_settings({"HF_MODEL_LOAD_FORMAT": "pt"})


def test_folder_has_no_weights_and_a_padded_tokenizer_that_encodes_as_before(tiny_dummy, embedded_folder):
    from transformers import AutoTokenizer

    assert not list(tiny_dummy.glob("*.safetensors")) and (tiny_dummy / "chat_template.jinja").is_file()
    config = json.loads((tiny_dummy / "config.json").read_text())
    assert config["vocab_size"] == SHAPES["tiny"]["vocab_size"] and config["rope_scaling"]["rope_type"] == "llama3"
    padded, original = (
        AutoTokenizer.from_pretrained(str(tiny_dummy)),
        AutoTokenizer.from_pretrained(str(embedded_folder)),
    )
    assert len(padded) == config["vocab_size"] > len(original)
    text = "Hello <|im_start|>user\nÇa va? 你好 1234 zqab"
    assert padded.encode(text) == original.encode(text)
    assert padded.decode([config["vocab_size"] - 1]).startswith(" zq")  # an extra id is plain text


def test_dummy_model_is_random_seeded_and_on_the_asked_dtype(tiny_dummy):
    first = load_model(dummy_settings(tiny_dummy, dtype="float32")).model
    again = load_model(dummy_settings(tiny_dummy, dtype="float32")).model
    embed = first.get_input_embeddings().weight
    assert embed.device.type == "cpu" and embed.dtype == torch.float32
    embed = embed.detach()
    assert 0.015 < float(embed.std()) < 0.025 and float(embed.abs().max()) > 0  # N(0, 0.02), not zeros
    probe = embed[:3]  # the linear layers are packed for a CPU kernel (dense weights freed): compare what they compute
    with torch.inference_mode():
        assert torch.equal(first.lm_head(probe), again.lm_head(probe))  # same seed, same weights
    assert torch.equal(first.model.norm.weight, torch.ones_like(first.model.norm.weight))
    half = load_model(dummy_settings(tiny_dummy, dtype="bfloat16")).model
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_ids_past_the_tokenizer_stream_as_empty_text(tmp_path, embedded_folder):
    """An unpadded tokenizer far smaller than the vocab: most greedy ids are unknown to it; requests still finish."""
    folder = write_folder(tmp_path / "wide", "tiny", embedded_folder, pad=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 4 * 49152}))
    settings = dummy_settings(
        folder, dtype="float32", max_concurrent_requests=4, max_total_tokens=256, max_batch_total_tokens=TINY_KV_TOKENS
    )
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    try:
        client = create_app(settings, engine).test_client()
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "ignore_eos": True}
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.get_data(as_text=True)
        assert reply.get_json()["usage"]["completion_tokens"] == 12
        assert isinstance(reply.get_json()["choices"][0]["message"]["content"], str)
        stream = client.post("/v1/chat/completions", json={**body, "stream": True}).get_data(as_text=True)
        assert "data: [DONE]" in stream and "error" not in stream
    finally:
        engine.stop()
