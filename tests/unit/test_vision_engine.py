"""Images through the engine: a tiny Qwen2.5-VL (M-RoPE) and a tiny Idefics3 give, greedy, exactly the tokens of
the model's own ``generate`` on the same processed inputs, batched with text requests and in small prefill chunks."""

from __future__ import annotations

import base64
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from serve.engine import Request, SamplingParams
from serve.front.images import ImageLimits, prompt_with_images
from serve.wiring import single_engine
from tests.vision_models import build_tiny_idefics3, build_tiny_qwen2_5_vl

BUILDERS = {"qwen2_5_vl": build_tiny_qwen2_5_vl, "idefics3": build_tiny_idefics3}
NEW_TOKENS = 8


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def png(seed: int, width: int = 84, height: int = 56) -> bytes:
    pixels = (np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vision_engine(request, tmp_path_factory, embedded_folder, tiny_settings):
    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param), embedded_folder)
    settings = replace(tiny_settings, model_id=str(folder), kv_block_size=4, max_batch_prefill_tokens=16)
    engine = single_engine(settings).start()
    assert engine.wait_ready(120), engine.load_error
    engine.config_folder = str(folder)  # the reference loads its own copy, with transformers' attention
    yield engine
    engine.stop()


def image_request(engine, text: str, images: list[bytes]) -> Request:
    """A chat prompt with ``images`` before ``text``, processed as the front does."""
    tokenizer = engine.tokenizer
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prompt_ids, inputs = prompt_with_images(tokenizer, ids, [data_url(image) for image in images], ImageLimits())
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return Request(prompt_ids=prompt_ids, params=params, images=inputs)


def reference(engine, request: Request) -> list[int]:
    """The model's own greedy ``generate`` over the same ids and arrays (transformers' attention and positions)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(engine.config_folder, dtype=torch.float32).eval()
    arrays = {key: torch.as_tensor(value) for key, value in request.images.arrays.items()}
    ids = torch.tensor([request.prompt_ids])
    extra = {"mm_token_type_ids": (ids == request.images.token_id).int()} if "image_grid_thw" in arrays else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            **arrays,
            **extra,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            min_new_tokens=NEW_TOKENS,
        )
    return out[0, ids.shape[1] :].tolist()


def tokens(stream) -> list[int]:
    return [event.token_id for event in stream if event.token_id is not None]


def test_images_give_the_tokens_of_the_models_own_generate(vision_engine):
    requests = [
        image_request(vision_engine, "what is here?", [png(1)]),
        image_request(vision_engine, "and these two?", [png(2, 56, 84), png(3)]),
    ]
    text = Request(
        prompt_ids=vision_engine.tokenizer("just text")["input_ids"],
        params=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    )
    streams = [vision_engine.submit(request) for request in requests + [text]]  # one batch, chunks of 16 tokens
    got = [tokens(stream) for stream in streams]
    assert all(len(request.prompt_ids) > 16 for request in requests)  # each prompt spans several chunks
    assert got[:2] == [reference(vision_engine, request) for request in requests]
    assert len(got[2]) == NEW_TOKENS


def test_the_prefix_cache_tells_images_apart(vision_engine):
    def run(seed: int):
        final = list(vision_engine.submit(image_request(vision_engine, "what is here?", [png(seed)])))[-1]
        return final.cached_tokens

    first, again, other = run(11), run(11), run(12)
    assert first == 0 and again > 0  # the same image and text: its full blocks are reused
    assert other == 0  # the same tokens with another image share nothing
