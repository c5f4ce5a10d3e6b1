"""Tensors in, tokens out: lay out one step's tokens, run the model once over all of them, sample."""

from __future__ import annotations

from typing import Any, Optional

import torch

from serve.engine.attention import BACKEND_NAME, PrefillChunk, StepLayout, active_step
from serve.engine.kv_cache import SlotKVCache
from serve.engine.sampling import make_generator, sample_next_tokens
from serve.engine.scheduler import StepPlan
from serve.engine.sequence import Sequence
from serve.engine.types import SamplingParams

EMPTY = torch.empty(0, dtype=torch.long)


class UnsupportedModel(RuntimeError):
    """The architecture does not route attention through transformers' attention interface."""


class ModelRunner:
    """Owns the model and the KV cache; ``step(plan)`` returns the sequences that got a new token, and the tokens."""

    def __init__(self, model: Any, cache: SlotKVCache):
        if not getattr(model, "_supports_attention_backend", False):
            raise UnsupportedModel(f"{type(model).__name__} does not support pluggable attention; it cannot be batched")
        model.set_attn_implementation(BACKEND_NAME)
        self.model = model
        self.cache = cache
        self.device = model.device

    def generator_for(self, params: SamplingParams) -> Optional[torch.Generator]:
        return make_generator(params, self.device)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[list[Sequence], list[int]]:
        """One forward pass over the plan; sample for decode rows and for prompts whose last chunk just ran."""
        input_ids, positions, layout, sampled, logit_rows = self._layout(plan)
        with active_step(self.cache, layout):
            output = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=logit_rows)
        for seq in plan.decode:
            seq.num_cached += 1
        for seq, count in plan.prefill:
            seq.num_cached += count
        if not sampled:
            return [], []
        return sampled, self.sample(output.logits[0], sampled)

    def _layout(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, StepLayout, list[Sequence], torch.Tensor]:
        ids: list[int] = []
        slots: list[int] = []
        positions: list[int] = []
        for seq in plan.decode:
            ids.append(seq.all_ids[-1])
            slots.append(seq.slot)
            positions.append(seq.num_cached)
        sampled, logit_rows = list(plan.decode), list(range(len(plan.decode)))
        chunks: list[PrefillChunk] = []
        for seq, count in plan.prefill:
            start = len(ids)
            ids.extend(seq.request.prompt_ids[seq.num_cached : seq.num_cached + count])
            slots.extend([seq.slot] * count)
            positions.extend(range(seq.num_cached, seq.num_cached + count))
            chunks.append(PrefillChunk(start, len(ids), seq.slot, seq.num_cached, self._chunk_mask(seq.num_cached, count)))
            if count == seq.prompt_left:
                sampled.append(seq)
                logit_rows.append(len(ids) - 1)
        rows = [slot * self.cache.slot_tokens + position for slot, position in zip(slots, positions)]
        layout = StepLayout(
            rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            decode_tokens=torch.arange(len(plan.decode), device=self.device),
            decode_slots=torch.tensor([seq.slot for seq in plan.decode], dtype=torch.long, device=self.device),
            decode_span=max((seq.slot for seq in plan.decode), default=-1) + 1,
            decode_mask=self._decode_mask(plan.decode),
            prefills=chunks,
        )
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        return as_tensor(ids), as_tensor(positions), layout, sampled, as_tensor(logit_rows)

    def _decode_mask(self, decode: list[Sequence]) -> Optional[torch.Tensor]:
        """[span, 1, 1, longest]: slot s sees its first (cached + 1) positions; idle slots see position 0 only."""
        if not decode:
            return None
        span = max(seq.slot for seq in decode) + 1
        lengths = torch.ones(span, dtype=torch.long)
        for seq in decode:
            lengths[seq.slot] = seq.num_cached + 1
        longest = int(lengths.max())
        mask = torch.arange(longest)[None, :] < lengths[:, None]
        return mask[:, None, None, :].to(self.device)

    def _chunk_mask(self, position: int, count: int) -> Optional[torch.Tensor]:
        """Causal mask for a chunk that starts after ``position`` cached tokens (None: plain causal from 0)."""
        if position == 0:
            return None
        rows = torch.arange(count)[:, None] + position
        return (torch.arange(position + count)[None, :] <= rows).to(self.device)

    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        """Next token id for each sequence, from its row of ``logits``."""
        params = [seq.request.params for seq in sequences]
        histories, outputs = [], []
        for seq, p in zip(sequences, params):
            penalized = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
            histories.append(torch.tensor(seq.all_ids, device=self.device) if penalized else EMPTY)
            outputs.append(torch.tensor(seq.output_ids, dtype=torch.long, device=self.device) if penalized else EMPTY)
        return sample_next_tokens(logits, params, [seq.generator for seq in sequences], histories, outputs).tolist()
