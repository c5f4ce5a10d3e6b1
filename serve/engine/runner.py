"""Tensors in, logits out: prefill and decode steps over a transformers model and its KV cache."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from serve.engine.sampling import make_generator, sample_next_tokens
from serve.engine.sequence import Sequence as SequenceState
from serve.engine.types import SamplingParams


class ModelRunner:
    """Runs forward passes for one sequence at a time, keeping its KV cache between steps."""

    def __init__(self, model: Any):
        self.model = model
        self.device = model.device

    @torch.inference_mode()
    def prefill(self, prompt_ids: list[int]) -> tuple[torch.Tensor, Any]:
        """Run the whole prompt; return the last position's logits [1, vocab] and the KV cache."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        output = self.model(input_ids=input_ids, use_cache=True)
        return output.logits[:, -1, :], output.past_key_values

    @torch.inference_mode()
    def decode(self, token_id: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """Feed one new token; return its logits [1, vocab] and the grown cache."""
        input_ids = torch.tensor([[token_id]], dtype=torch.long, device=self.device)
        output = self.model(input_ids=input_ids, past_key_values=cache, use_cache=True)
        return output.logits[:, -1, :], output.past_key_values

    def generator_for(self, params: SamplingParams) -> Optional[torch.Generator]:
        return make_generator(params, self.device)

    def sample(self, logits: torch.Tensor, sequences: Sequence[SequenceState], generators: Sequence[Optional[torch.Generator]]) -> list[int]:
        """Next token id for each sequence, from its row of ``logits``."""
        histories = [torch.tensor(seq.all_ids, dtype=torch.long, device=self.device) for seq in sequences]
        outputs = [torch.tensor(seq.output_ids, dtype=torch.long, device=self.device) for seq in sequences]
        params = [seq.request.params for seq in sequences]
        return sample_next_tokens(logits, params, generators, histories, outputs).tolist()
