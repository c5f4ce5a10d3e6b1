"""Tensors in, tokens out: lay out one step's tokens, run the model once over all of them, sample."""

from __future__ import annotations

from typing import Any, Optional

import torch

from serve.engine.attention import BACKEND_NAME, PrefillChunk, StepLayout, active_step
from serve.engine.kv_cache import SlotKVCache
from serve.engine.sampling import chosen_logprobs, make_generator, sample_next_tokens
from serve.engine.scheduler import StepPlan
from serve.engine.sequence import Sequence
from serve.engine.types import SamplingParams, TokenChoice

EMPTY = torch.empty(0, dtype=torch.long)


class UnsupportedModel(RuntimeError):
    """The architecture does not route attention through transformers' attention interface."""


class ModelRunner:
    """Owns the model and the KV cache; ``step(plan)`` returns the sequences that got a new token, and the tokens."""

    def __init__(self, model: Any, cache: SlotKVCache, grammars: Any = None):
        if not getattr(model, "serve_calls_attend", False):  # lean models (serve/models/) call attend() themselves
            if not getattr(model, "_supports_attention_backend", False):
                name = type(model).__name__
                raise UnsupportedModel(f"{name} does not support pluggable attention; it cannot be batched")
            model.set_attn_implementation(BACKEND_NAME)
        self.model = model
        self.cache = cache
        self.grammars = grammars  # serve.engine.grammar.Grammars: masks the logits of constrained sequences
        self.device = model.device
        self.lora = getattr(model, "serve_lora", None)  # serve.engine.lora.LoraSet when adapters are loaded

    def generator_for(self, params: SamplingParams) -> Optional[torch.Generator]:
        return make_generator(params, self.device)

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> tuple[list[Sequence], list[TokenChoice]]:
        """One forward pass over the plan; sample for decode rows and for prompts whose last chunk just ran."""
        input_ids, positions, layout, sampled, logit_rows, scored = self._layout(plan)
        if self.lora is not None:
            self.lora.begin_plan(plan)  # each token's adapter, in the layout's order
        with active_step(self.cache, layout):
            output = self.model(input_ids=input_ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=logit_rows)
        for seq in plan.decode:
            seq.num_cached += 1
        for seq, count in plan.prefill:
            seq.num_cached += count
        logits = output.logits[0]
        self._score_prompts(logits[len(sampled) :], scored)
        if not sampled:
            return [], []
        return sampled, self.sample(logits[: len(sampled)], sampled)

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list[tuple[Sequence, list[int]]]) -> None:
        """Log-probabilities of prompt tokens, for sequences that asked (each logit row predicts the next token)."""
        start = 0
        for seq, targets in scored:
            rows = logits[start : start + len(targets)].float()
            start += len(targets)
            picked = torch.log_softmax(rows, dim=-1).gather(-1, torch.tensor(targets, device=rows.device)[:, None])
            seq.prompt_logprobs.extend(picked.squeeze(-1).tolist())

    def _layout(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, StepLayout, list[Sequence], torch.Tensor, list]:
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
        scored = self._prompt_rows(plan, logit_rows)
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
        return as_tensor(ids), as_tensor(positions), layout, sampled, as_tensor(logit_rows), scored

    @staticmethod
    def _prompt_rows(plan: StepPlan, logit_rows: list[int]) -> list[tuple[Sequence, list[int]]]:
        """Add the rows of prompt chunks whose sequences want prompt log-probabilities; return their target tokens."""
        scored, start = [], len(plan.decode)
        for seq, count in plan.prefill:
            prompt = seq.request.prompt_ids
            targets = prompt[seq.num_cached + 1 : seq.num_cached + count + 1]  # the token each position predicts
            if seq.request.params.prompt_logprobs and targets:
                logit_rows.extend(range(start, start + len(targets)))
                scored.append((seq, targets))
            start += count
        return scored

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

    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[TokenChoice]:
        """Next token for each sequence from its row of ``logits``: grammar-masked, sampled, with log-probabilities.

        Log-probabilities are those of the model's own distribution (before penalties, temperature and grammar).
        """
        params = [seq.request.params for seq in sequences]
        wants_logprobs = [p.logprobs is not None for p in params]
        log_probs = torch.log_softmax(logits.float(), dim=-1) if any(wants_logprobs) else None
        logits = logits.float()
        if self.grammars is not None:
            logits = self.grammars.mask(logits, [seq.matcher for seq in sequences])
        histories, outputs = [], []
        for seq, p in zip(sequences, params):
            penalized = p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty
            histories.append(torch.tensor(seq.all_ids, device=self.device) if penalized else EMPTY)
            outputs.append(torch.tensor(seq.output_ids, dtype=torch.long, device=self.device) if penalized else EMPTY)
        tokens = sample_next_tokens(logits, params, [seq.generator for seq in sequences], histories, outputs)
        if log_probs is None:
            return [TokenChoice(token) for token in tokens.tolist()]
        scores = chosen_logprobs(log_probs, tokens, [p.logprobs or 0 for p in params])
        return [
            TokenChoice(token, logprob, top) if wanted else TokenChoice(token)
            for token, (logprob, top), wanted in zip(tokens.tolist(), scores, wants_logprobs)
        ]
