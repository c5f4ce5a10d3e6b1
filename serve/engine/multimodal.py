"""Images in a prompt: their features, computed once when the sequence starts, fill the prompt's image tokens.

A vision-language model's prompt holds one placeholder token per image feature (the front expanded them). When
its sequence starts, the model's own ``get_image_features`` encodes the request's images once; every prefill
chunk then embeds its tokens and puts, at each image-token position it covers, that position's feature row, so a
chunk boundary may fall anywhere inside an image and a recomputation after preemption reuses the features.
Models with multimodal rotary positions (Qwen2-VL's M-RoPE) also get each prompt token's (t, h, w) positions from
the model's ``get_rope_index``; the tokens after the prompt continue at ``position + delta`` in all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from serve.engine.types import ImageInputs


class ImageInputError(ValueError):
    """The request's images do not fit its prompt (a count mismatch) or the model cannot encode them."""


@dataclass
class PromptImages:
    """A sequence's encoded images: ``features[i]`` fills prompt position ``rows[i]``; ``positions`` [3, prompt]
    the M-RoPE positions of the prompt (None: plain positions), ``delta`` what later positions add."""

    features: torch.Tensor
    rows: list[int]
    positions: Optional[torch.Tensor] = None
    delta: int = 0

    def rows_in(self, start: int, end: int) -> tuple[list[int], torch.Tensor]:
        """The image-token positions within prompt positions [start, end), and their feature rows."""
        picked = [index for index, row in enumerate(self.rows) if start <= row < end]
        return [self.rows[index] for index in picked], self.features[picked]


def takes_images(model: Any) -> bool:
    """Whether ``model`` encodes images (a vision-language model with ``get_image_features``)."""
    return callable(getattr(model, "get_image_features", None)) and hasattr(model.config, "vision_config")


def uses_mrope(model: Any) -> bool:
    """Whether the model's rotary positions are three-dimensional (Qwen2-VL's M-RoPE)."""
    return callable(getattr(getattr(model, "model", None), "get_rope_index", None))


def text_only_attention(model: Any, backend: str) -> dict[str, str]:
    """The attention implementations that route only the language model through ``backend``: a vision tower keeps
    its own (it attends within each image, not over the paged cache)."""
    config = model.config
    plan = {}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        plan[key] = backend if key == "text_config" else getattr(sub, "_attn_implementation", None) or "sdpa"
    return plan


@torch.inference_mode()
def encode_images(model: Any, prompt_ids: list[int], images: ImageInputs, device: torch.device) -> PromptImages:
    """Encode a request's images with the model's vision tower; ImageInputError when they do not fit the prompt."""
    if not takes_images(model):
        raise ImageInputError(f"{type(model).__name__} does not take images")
    arrays = {name: torch.as_tensor(value, device=device) for name, value in images.arrays.items()}
    try:
        output = model.get_image_features(**arrays, return_dict=True)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ImageInputError(f"the model could not encode the images: {exc}") from exc
    features = torch.cat([part.reshape(-1, part.shape[-1]) for part in output.pooler_output])
    rows = [position for position, token in enumerate(prompt_ids) if token == images.token_id]
    if len(rows) != features.shape[0]:
        raise ImageInputError(f"the prompt holds {len(rows)} image tokens but its images make {features.shape[0]}")
    encoded = PromptImages(features.to(model.dtype), rows)
    if uses_mrope(model):
        encoded.positions, encoded.delta = _mrope_positions(model, prompt_ids, images.token_id, arrays)
    return encoded


def _mrope_positions(model: Any, prompt_ids: list[int], token_id: int, arrays: dict) -> tuple[torch.Tensor, int]:
    """The prompt's [3, prompt] M-RoPE positions and the offset of the positions after it."""
    ids = torch.tensor([prompt_ids], device=arrays["image_grid_thw"].device)
    positions, delta = model.model.get_rope_index(
        ids, mm_token_type_ids=(ids == token_id).int(), image_grid_thw=arrays["image_grid_thw"]
    )
    return positions[:, 0, :].cpu(), int(delta.reshape(-1)[0])


def with_images(inputs: Any, spans: list[tuple[Any, int, int, int]], mrope: bool) -> None:
    """Add to a step's ``inputs`` the image features its prompt chunks cover and, for an M-RoPE model, every token's
    three positions. ``spans``: (sequence, index in the step, first position, token count) of each row or chunk."""
    rows, features, rope = [], [], []
    for seq, start, first, count in spans:
        images = seq.images
        if mrope:
            rope.append(rope_positions(images, len(seq.request.prompt_ids), first, count))
        if images is not None:
            found, picked = images.rows_in(first, first + count)
            rows.extend(start + row - first for row in found)
            features.append(picked)
    if rows:
        inputs.image_rows, inputs.image_features = rows, torch.cat(features)
    if mrope:
        inputs.rope_positions = torch.cat(rope, dim=1)


def rope_positions(images: Optional[PromptImages], prompt: int, first: int, count: int) -> torch.Tensor:
    """[3, count] M-RoPE positions of a sequence's positions [first, first + count): the prompt's own from
    ``get_rope_index``, then ``position + delta`` in all three (a text-only sequence: its position three times)."""
    span = torch.arange(first, first + count)
    if images is None or images.positions is None:
        return span.expand(3, -1)
    positions = (span + images.delta).expand(3, -1).clone()
    inside = span < prompt
    positions[:, inside] = images.positions[:, span[inside]].to(positions.dtype)
    return positions
