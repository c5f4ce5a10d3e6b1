"""Tiny random vision-language models with their processors, built by the tests: Qwen2.5-VL and Idefics3."""

from __future__ import annotations

from pathlib import Path

INIT_RANGE = 0.2  # wider than the default 0.02: a random model whose answers depend on the image

# A ChatML template that, like Qwen2-VL's own, renders an image part as its placeholder between vision markers.
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part.text }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Idefics3's shape: "User:<image>text<end_of_utterance>\nAssistant:".
IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message.role | capitalize }}:"
    "{% if message.content is string %}{{ message.content }}{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<image>{% else %}{{ part.text }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _tokenizer(source: Path, tokens: list[str], template: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = template
    return tokenizer


def build_tiny_qwen2_5_vl(target: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """A random two-layer Qwen2.5-VL (M-RoPE, a two-block vision tower) with the embedded model's tokenizer."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    markers = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(tokenizer_source, markers, QWEN_TEMPLATE)
    ids = dict(zip(markers, tokenizer.convert_tokens_to_ids(markers)))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    text.update(num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024)
    text.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, eos_token_id=tokenizer.eos_token_id)
    text.update(initializer_range=INIT_RANGE)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14)
    vision.update(spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56)
    vision.update(initializer_range=INIT_RANGE)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64).save_pretrained(target)
    return target


def build_tiny_idefics3(target: Path, tokenizer_source: Path, seed: int = 0) -> Path:
    """A random two-layer Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama text model)."""
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    markers = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *rows]
    tokenizer = _tokenizer(tokenizer_source, markers, IDEFICS3_TEMPLATE)
    text = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    text.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer))
    text.update(max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id, initializer_range=INIT_RANGE)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56)
    vision.update(patch_size=14, initializer_range=INIT_RANGE)
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    Idefics3ForConditionalGeneration(config).save_pretrained(target, safe_serialization=True)
    images = Idefics3ImageProcessorPil(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})
    Idefics3Processor(images, tokenizer, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE).save_pretrained(target)
    return target
