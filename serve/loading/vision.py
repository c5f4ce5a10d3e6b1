"""How a vision-language checkpoint takes images: its image processor and how one image's placeholder expands.

The model's own processor (``AutoProcessor``) does it where it loads, through its ``replace_image_token``. Qwen2-VL's
processors also need torchvision for their video half, which a CPU install lacks; there the image processor alone
makes the arrays and each placeholder becomes one ``<|image_pad|>`` per merged patch, as that processor writes it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from serve.engine.types import ImageInputs

log = logging.getLogger(__name__)

# model type -> the arrays its get_image_features takes
VISION_FAMILIES = {
    "qwen2_vl": ("pixel_values", "image_grid_thw"),
    "qwen2_5_vl": ("pixel_values", "image_grid_thw"),
    "idefics3": ("pixel_values", "pixel_attention_mask"),
    "smolvlm": ("pixel_values", "pixel_attention_mask"),
}
QWEN_VL = ("qwen2_vl", "qwen2_5_vl")


class ImagePrompt:
    """A vision-language model's way with images: its image processor makes the model's arrays, and ``expand`` turns
    image ``i``'s placeholder into the token ids its features fill (``model_keys``: the arrays the model takes)."""

    def __init__(
        self,
        process: Callable[[list[Any]], dict[str, Any]],
        expand: Callable[[dict[str, Any], int], list[int]],
        token_id: int,
        model_keys: tuple[str, ...],
    ):
        self.process = process
        self.expand = expand
        self.token_id = token_id
        self.model_keys = model_keys

    def inputs(self, prompt_ids: list[int], pictures: list[Any], digests: tuple[str, ...]) -> tuple[list[int], Any]:
        """The prompt with each image's placeholder expanded, and the images' arrays for the engine (ImageInputs);
        ValueError when the prompt's markers do not match the images or the processor refuses one."""
        places = [index for index, token in enumerate(prompt_ids) if token == self.token_id]
        if len(places) != len(pictures):
            raise ValueError(f"the chat template placed {len(places)} image markers for {len(pictures)} images")
        try:
            arrays = self.process(pictures)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the model's image processor refused an image: {exc}") from exc
        expanded, start = [], 0
        for index, place in enumerate(places):
            expanded += prompt_ids[start:place] + self.expand(arrays, index)
            start = place + 1
        expanded += prompt_ids[start:]
        kept = {key: arrays[key] for key in self.model_keys if key in arrays}
        return expanded, ImageInputs(kept, self.token_id, digests)


def image_prompt(folder: Path, config: Any, tokenizer: Any, trust_remote_code: bool = False) -> Optional[ImagePrompt]:
    """The ImagePrompt of a vision-language model in ``folder`` (None for a text-only model, or a family whose
    images this server does not take: logged)."""
    if getattr(config, "vision_config", None) is None:
        return None
    keys = VISION_FAMILIES.get(config.model_type)
    if keys is None:
        log.warning("images are not taken for model type %r (%s)", config.model_type, ", ".join(VISION_FAMILIES))
        return None
    token_id = config.image_token_id
    processor = _processor(folder, trust_remote_code)
    if processor is not None and hasattr(processor, "replace_image_token"):
        expand = _by_processor(processor, tokenizer)
        return ImagePrompt(_processing(processor.image_processor, config), expand, token_id, keys)
    if config.model_type in QWEN_VL:
        from transformers import AutoImageProcessor

        images = AutoImageProcessor.from_pretrained(str(folder))
        return ImagePrompt(_processing(images, config), _merged_patches(images, token_id), token_id, keys)
    log.warning("images are not taken: the processor of %r does not load here", config.model_type)
    return None


def _processor(folder: Path, trust_remote_code: bool) -> Any:
    """The checkpoint's AutoProcessor, or None where it does not load (Qwen2-VL's without torchvision)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (ImportError, OSError, ValueError, TypeError, AttributeError) as exc:
        log.info("the model's processor does not load (%s); its image processor alone is used", exc)
        return None


def _processing(images: Any, config: Any) -> Any:
    """A function from PIL images to the image processor's arrays (one prompt's images)."""
    nested = config.model_type not in QWEN_VL  # Idefics3's processors take a list of images per prompt

    def process(pictures: list[Any]) -> dict[str, Any]:
        extra = {"return_row_col_info": True} if nested else {}
        return dict(images(images=[pictures] if nested else pictures, return_tensors="np", **extra))

    return process


def _by_processor(processor: Any, tokenizer: Any) -> Any:
    """Image ``index``'s token ids, as the model's processor writes its placeholder's replacement."""

    def expand(arrays: dict[str, Any], index: int) -> list[int]:
        text = processor.replace_image_token(arrays, index)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return expand


def _merged_patches(images: Any, token_id: int) -> Any:
    """Qwen2-VL's expansion: one image token per ``merge_size``² patches of the image's grid."""
    merge = getattr(images, "merge_size", 2)

    def expand(arrays: dict[str, Any], index: int) -> list[int]:
        return [token_id] * (int(arrays["image_grid_thw"][index].prod()) // merge**2)

    return expand
