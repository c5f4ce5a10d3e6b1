"""Tensors in, tokens out: lay out one step's tokens, run the model once over all of them, sample."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch

from serve.engine.ahead import HostCopy, Sampled
from serve.engine.attention import BACKEND_NAME, active_step
from serve.engine.block_manager import SCRATCH_BLOCK
from serve.engine.kv_cache import PagedKVCache
from serve.engine.multimodal import takes_images, text_only_attention, uses_mrope, with_images
from serve.engine.graphs import GraphReport, capture_decode_graphs
from serve.engine.piecewise import PiecewiseReport, capture_piecewise
from serve.engine.sampling import (
    NON_FINITE,
    finite_rows,
    logprob_table,
    make_generator,
    mark_non_finite,
    prompt_scores,
    sample_next_tokens,
    unpack_logprobs,
)
from serve.engine.penalties import TokenCounts, apply_penalties, count_sampled, penalized
from serve.engine.scheduler import StepOutput, StepPlan
from serve.engine.sequence import Sequence
from serve.engine.static_decode import StaticDecode
from serve.engine.speculative import accept_proposals
from serve.engine.step_inputs import Span, StepInputs
from serve.engine.types import STEP_PATHS, SamplingParams, TokenChoice
from serve.engine.uploads import Uploads
from serve.engine.watermark import apply_watermarks
from serve.engine.compile import CompileReport, compile_layers, probe_logits

log = logging.getLogger(__name__)


class UnsupportedModel(RuntimeError):
    """The architecture does not route attention through transformers' attention interface."""


class ModelRunner:
    """Owns the model and the KV cache; ``step(plan)`` returns the sequences that got a new token, and the tokens."""

    def __init__(
        self,
        model: Any,
        cache: PagedKVCache,
        grammars: Any = None,
        max_batch: int = 1,
        max_blocks: int = 1,
        cpu_threads: Optional[int] = None,
        ranks: Any = None,
    ):
        """``max_batch`` sequences of up to ``max_blocks`` KV blocks each may decode in one step; ``cpu_threads``:
        torch's threads for every step on the CPU (None: leave torch's count alone); ``ranks``: the other
        tensor-parallel ranks (serve.engine.ranks.RankGroup), which run every forward of this runner with it."""
        if not getattr(model, "serve_calls_attend", False):  # lean models (serve/modeling/) call attend() themselves
            if not getattr(model, "_supports_attention_backend", False):
                name = type(model).__name__
                raise UnsupportedModel(f"{name} does not support pluggable attention; it cannot be batched")
            vision = takes_images(model)  # a vision tower keeps its own attention
            model.set_attn_implementation(text_only_attention(model, BACKEND_NAME) if vision else BACKEND_NAME)
        self.model = model
        self.cache = cache
        self.grammars = grammars  # serve.engine.grammar.Grammars: masks the logits of constrained sequences
        self.device = model.device
        self.lora = getattr(model, "serve_lora", None)  # serve.engine.lora.LoraSet when adapters are loaded
        self.static = StaticDecode(model, cache, self.device, max_batch, max_blocks)
        self.graphs = GraphReport(reason="not captured")
        self.compiled = CompileReport()
        self.host_reads = 0  # device-to-host transfers so far (to_host); tests count them per step
        self.uploads = Uploads(self.device)  # the step's small host-to-device copies, pinned and non-blocking
        self.counts = TokenCounts(model.config.get_text_config().vocab_size, self.device, self.uploads)  # penalties
        self.cpu_threads = cpu_threads
        self.ranks = ranks
        self.mrope = uses_mrope(model)  # three-dimensional rotary positions (Qwen2-VL's M-RoPE)
        self.hidden_observer: Optional[Callable[[list[Span]], None]] = None  # told each forward's spans (EAGLE-3)
        self.step_paths = [0] * len(STEP_PATHS)  # steps by path (types.STEP_PATHS): graphed, fixed shape, eager
        self.piecewise: Any = None  # serve.engine.piecewise.PiecewiseHalves once captured

    def capture_graphs(self, step_tokens: int = 0, capture: Any = None) -> GraphReport:
        """Capture the decode shapes as CUDA graphs (a no-op with a reason off CUDA), then the halves of every layer
        for steps with prompt chunks of up to ``step_tokens`` tokens (serve/engine/piecewise.py; ``capture``: the
        tests' own). LoRA layers are captured without adapter rows: only steps in which no sequence uses an adapter
        replay them."""
        self._base_model_step()
        if self.ranks is not None:
            self.ranks.send_capture()
        self.graphs = capture_decode_graphs(self.static)
        parallel = self.ranks is not None or getattr(self.model, "parallel", None) is not None
        self.graphs.mixed = capture_piecewise(self.model, step_tokens, capture, parallel)
        self.piecewise = getattr(self.model, "serve_piecewise", None)
        return self.graphs

    def graphs_off(self, reason: str) -> None:
        """Decode runs eagerly: no shape is captured, for ``reason`` (the log and /info say it)."""
        self.graphs = GraphReport(reason=f"off: {reason}")
        log.warning("CUDA graphs off: %s", reason)

    def compile_layers(self, cache_dir: str) -> CompileReport:
        """COMPILE: torch.compile the lean model's layer halves (cache under ``cache_dir``), warmed up on the token
        counts that make the compiled graphs serve every later shape, and self-checked against eager."""
        if self.ranks is not None:  # its probes run on this rank alone: the others would wait in the collectives
            self.compiled = CompileReport(reason="off: COMPILE is not run under tensor parallelism")
            log.warning("COMPILE off: tensor parallelism (the ranks run the eager layers)")
            return self.compiled
        self._base_model_step()
        self.compiled = compile_layers(self.model, cache_dir, lambda: probe_logits(self.model, self.cache))
        return self.compiled

    def _run_eagerly(self, reason: str) -> None:
        """Turn COMPILE off from now on (the model's eager layer halves; piecewise graphs of the compiled ones go)."""
        self.model.layer_halves = self.model.eager_layer_halves
        if self.piecewise is not None:
            self.piecewise.uninstall()
            self.piecewise = None
            self.graphs.mixed = PiecewiseReport(reason=f"off since: {reason}")
        self.compiled = CompileReport(reason=f"off since: {reason}", seconds=self.compiled.seconds)
        log.warning("COMPILE off: %s; the model runs eagerly", reason)

    def _base_model_step(self) -> None:
        """The next forward uses no adapter (LoRA wrappers, if any, add nothing)."""
        if self.lora is not None:
            self.lora.begin_step([])

    def to_host(self, copy: HostCopy) -> list:
        """The one way a step reads the device: a single transfer (started at launch) as a Python list."""
        self.host_reads += 1
        return copy.read()

    def generator_for(self, params: SamplingParams) -> Optional[torch.Generator]:
        return make_generator(params, self.device)

    def step(self, plan: StepPlan) -> StepOutput:
        """One forward pass over the plan, its tokens read at once: ``collect(launch(plan))``."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan, pending: Optional[Sampled] = None) -> Sampled:
        """Run the plan's forward and sample, on the device: decode rows, and prompts whose last chunk just ran.
        ``pending``: the step before, launched and not collected; its sampled tokens, still on the device, are the
        input tokens of this step's rows of the sequences it sampled (serve/engine/ahead.py)."""
        if self.cpu_threads is not None and torch.get_num_threads() != self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)  # per thread: the engine's own thread computes with this many
        if self.compiled.enabled and self.lora is not None and self.lora.layers:
            self._run_eagerly("a LoRA adapter was loaded (its per-step rows are not traced)")
        verifying = any(seq.proposal for seq in plan.decode)
        if not plan.prefill and self._fits_static(plan.decode):
            self._base_model_step()
            return self._static_decode(plan.decode, pending)
        inputs, sampled, scored, spans = self._inputs(plan)
        if self.lora is None or all(adapter is None for adapter in inputs.adapters or ()):
            inputs.adapters = None  # a step on the base model alone (and a smaller message to the other ranks)
        self.step_paths[self._eager_path(inputs)] += 1
        inputs.fed = _fed_rows(enumerate(seq for seq in plan.decode if not seq.proposal), pending)  # decode leads
        logits = self.forward(inputs, _tokens_of(pending))
        if self.hidden_observer is not None:
            self.hidden_observer(spans)
        for seq in plan.decode:
            seq.num_cached += 1
        for seq, count in plan.prefill:
            seq.num_cached += count
        self._score_prompts(logits[len(sampled) :], scored)
        if not sampled:
            return Sampled([])
        return self._sampled(logits[: len(sampled)], sampled, verifying)

    def _eager_path(self, inputs: StepInputs) -> int:
        """The path of a step off the fixed decode shape (STEP_PATHS' index): its layer halves replayed piecewise,
        when a bucket holds its tokens and no adapter runs in it (captured without adapter rows), else eager."""
        if self.piecewise is None:
            return 2
        self.piecewise.active = inputs.adapters is None
        return 3 if self.piecewise.bucket(len(inputs.ids)) is not None else 2

    def collect(self, sampled: Sampled) -> StepOutput:
        """A launched step's tokens on the host (its one read), each verified run cut to what was accepted."""
        choices = self.choices(sampled)
        return accept_proposals(sampled.sequences, choices) if sampled.verifying else (sampled.sequences, choices)

    def _sampled(self, logits: torch.Tensor, sequences: list[Sequence], verifying: bool) -> Sampled:
        sampled = self.sample(logits, sequences)
        sampled.verifying = verifying
        return sampled

    def feed_pending(self, ids: torch.Tensor, fed: list[tuple[int, int]], tokens: Optional[torch.Tensor]) -> None:
        """Write a pending step's sampled ``tokens``, still on the device, into this step's input ``ids``: ``fed``
        pairs (row here, row there). A row whose logits were not finite feeds token 0: its sequence ends with an error
        when the pending step is collected, and this step's row of it is dropped. Under tensor parallelism rank 0
        broadcasts the values and the other ranks (``tokens`` None) receive them."""
        if not fed:
            return
        index = self.uploads.tensor(fed, torch.long)
        if tokens is not None:
            values = tokens.index_select(0, index[:, 1]).clamp_(min=0)
        else:
            values = torch.empty(len(fed), dtype=torch.long, device=ids.device)
        parallel = getattr(self.model, "parallel", None)
        if parallel is not None:
            parallel.broadcast(values)
        ids.index_copy_(0, index[:, 0], values)

    def forward(self, inputs: StepInputs, pending_tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The model over one laid-out step: logits [kept rows, vocab]. The other tensor-parallel ranks, if any, get
        the same inputs first and run their shards alongside. ``pending_tokens``: the tokens of a step not yet read,
        the input ids of the rows ``inputs.fed`` names."""
        if self.ranks is not None:
            self.ranks.send_step(inputs)
        if self.lora is not None:
            self.lora.begin_step(inputs.adapters or ())  # each token's adapter, in the layout's order
        input_ids, positions, layout, logit_rows = inputs.tensors(self.uploads, self.cache.block_size)
        self.feed_pending(input_ids, inputs.fed, pending_tokens)
        tokens = {"input_ids": input_ids[None]}
        if inputs.image_features is not None:  # the prompt chunks' image tokens take their images' features
            embeds = self.model.get_input_embeddings()(input_ids)
            features = inputs.image_features.to(embeds.device, embeds.dtype)
            embeds[self.uploads.tensor(inputs.image_rows, torch.long)] = features
            tokens = {"inputs_embeds": embeds[None]}
        if inputs.rope_positions is not None:
            positions = inputs.rope_positions.to(self.device)[:, None, :]  # [3, 1, tokens]: M-RoPE's (t, h, w)
        else:
            positions = positions[None]
        with active_step(self.cache, layout):
            output = self.model(**tokens, position_ids=positions, use_cache=False, logits_to_keep=logit_rows)
        return output.logits[0]

    def _fits_static(self, decode: list[Sequence]) -> bool:
        """Whether a decode-only step runs over the fixed shapes: plain rows (``_plain_decode``), a verified proposal
        taking a row per scored token, no more rows than the static buffers hold."""
        rows = sum(1 + len(seq.proposal) for seq in decode)
        return rows <= self.static.max_batch and all(_plain_decode(seq) for seq in decode)

    def _static_decode(self, decode: list[Sequence], pending: Optional[Sampled] = None) -> Sampled:
        """A decode-only step over a fixed shape (a CUDA graph's replay where one was captured). A sequence with a
        proposal takes a row per scored token, each over the sequence's blocks up to its own position: every key and
        value is written before any row attends, so the rows are causal among themselves as a chunk's are."""
        rows, spans = [], []
        for seq in decode:
            tokens = [seq.all_ids[-1]] + seq.proposal
            spans.append((seq, len(rows), seq.num_cached, len(tokens)))
            rows.extend((token, seq.num_cached + index, seq.block_table) for index, token in enumerate(tokens))
        fed = _fed_rows(((start, seq) for seq, start, _, _ in spans), pending)
        shape = self.static.shape_for(len(rows), max(len(table) for _, _, table in rows))
        if self.ranks is not None:  # before the feed: its broadcast meets theirs
            self.ranks.send_decode(rows, shape, fed)
        batch, width = self.static.load(rows, shape)
        self.feed_pending(self.static.inputs, fed, _tokens_of(pending))  # the ids lead the static buffer
        self.step_paths[0 if (batch, width) in self.static.replay else 1] += 1
        logits = self.static.forward(batch, width)[: len(rows)]
        if self.hidden_observer is not None:
            self.hidden_observer(spans)
        for seq in decode:
            seq.num_cached += 1
        sampled = [seq for seq, _, _, count in spans for _ in range(count)]
        return self._sampled(logits, sampled, len(sampled) > len(decode))

    def _score_prompts(self, logits: torch.Tensor, scored: list[tuple[Sequence, list[int]]]) -> None:
        """Log-probabilities of prompt tokens, for sequences that asked (each logit row predicts the next token)."""
        start = 0
        for seq, targets in scored:
            rows = logits[start : start + len(targets)]
            picked, tops = prompt_scores(rows, targets, seq.request.params.logprobs or 0, self.uploads)
            start += len(targets)
            seq.prompt_logprobs.extend(picked)
            seq.prompt_top_logprobs.extend(tops)

    def _inputs(self, plan: StepPlan) -> tuple[StepInputs, list[Sequence], list, list[Span]]:
        """The step's inputs (decode tokens first, then each verified proposal and each prompt chunk as a chunk),
        the sequences to sample (a verifying one once per scored row), the prompt rows to score, and each
        sequence's span of the step."""
        size = self.cache.block_size
        decode = [seq for seq in plan.decode if not seq.proposal]
        ids = [seq.all_ids[-1] for seq in decode]
        positions = [seq.num_cached for seq in decode]
        rows = [seq.block_table[p // size] * size + p % size for seq, p in zip(decode, positions)]
        adapters = [seq.request.adapter for seq in decode]
        spans = [(seq, index, seq.num_cached, 1) for index, seq in enumerate(decode)]  # (seq, step index, first, count)
        sampled, logit_rows, chunks = list(decode), list(range(len(decode))), []
        verified = [(seq, [seq.all_ids[-1]] + seq.proposal, True) for seq in plan.decode if seq.proposal]
        prompts = [(seq, seq.prefill_ids[seq.num_cached :][:count], False) for seq, count in plan.prefill]
        for seq, tokens, verifying in verified + prompts:
            start, first = len(ids), seq.num_cached
            ids.extend(tokens)
            positions.extend(range(first, first + len(tokens)))
            rows.extend(seq.block_table[p // size] * size + p % size for p in range(first, first + len(tokens)))
            chunks.append((start, len(ids), first, seq.block_table[: -(-(first + len(tokens)) // size)]))
            spans.append((seq, start, first, len(tokens)))
            adapters.extend([seq.request.adapter] * len(tokens))
            kept = len(tokens) if verifying else int(len(tokens) == seq.prompt_left)
            sampled.extend([seq] * kept)
            logit_rows.extend(range(len(ids) - kept, len(ids)))
        scored = self._prompt_rows(plan, logit_rows, len(ids) - sum(count for _, count in plan.prefill))
        width = max((len(seq.block_table) for seq in decode), default=0)
        tables = [seq.block_table + [SCRATCH_BLOCK] * (width - len(seq.block_table)) for seq in decode]
        lengths = [seq.num_cached + 1 for seq in decode]
        inputs = StepInputs(ids, positions, rows, tables, lengths, chunks, logit_rows, adapters)
        if any(seq.images is not None for seq, *_ in spans):
            with_images(inputs, spans, self.mrope)
        return inputs, sampled, scored, spans

    @staticmethod
    def _prompt_rows(plan: StepPlan, logit_rows: list[int], start: int) -> list[tuple[Sequence, list[int]]]:
        """Add the rows of prompt chunks (the first at ``start``) whose sequences want prompt log-probabilities;
        return their target tokens."""
        scored = []
        for seq, count in plan.prefill:
            prompt = seq.prefill_ids
            targets = prompt[seq.num_cached + 1 : seq.num_cached + count + 1]  # the token each position predicts
            if seq.scores_prompt and targets:
                logit_rows.extend(range(start, start + len(targets)))
                scored.append((seq, targets))
            start += count
        return scored

    def _count_rows(self, sequences: list[Sequence]) -> list[Optional[int]]:
        """Each sequence's row of token counts on the device (None for sequences without penalties)."""
        wanted = [seq for seq in sequences if penalized(seq.request.params)]
        if not wanted:
            return [None] * len(sequences)
        tokens = [(seq.request.prompt_ids, seq.output_ids) for seq in wanted]
        found = dict(zip((seq.id for seq in wanted), self.counts.rows([seq.id for seq in wanted], tokens)))
        return [found.get(seq.id) for seq in sequences]

    def forget(self, seq: Sequence) -> None:
        """A sequence finished: drop what the runner keeps for it."""
        self.counts.release(seq.id)

    def sample(self, logits: torch.Tensor, sequences: list[Sequence]) -> Sampled:
        """Next token for each sequence from its row of ``logits``: grammar-masked, sampled, with log-probabilities;
        on the device, its copy to the host started (``choices`` reads it).

        Log-probabilities are those of the model's own distribution (before penalties, temperature and grammar).
        """
        params = [seq.request.params for seq in sequences]
        wants_logprobs = [p.logprobs is not None for p in params]
        log_probs = torch.log_softmax(logits.float(), dim=-1) if any(wants_logprobs) else None
        logits = logits.float()
        finite = finite_rows(logits)  # before the masks and penalties, which set -inf on purpose
        if any(p.watermark is not None for p in params):
            logits = apply_watermarks(logits, sequences, self.uploads)
        if self.grammars is not None:
            logits = self.grammars.mask(logits, [seq.matcher for seq in sequences], self.uploads)
        rows = self._count_rows(sequences)
        logits = apply_penalties(logits, params, self.counts, rows)
        tokens = sample_next_tokens(logits, params, [seq.generator for seq in sequences], self.uploads)
        count_sampled(self.counts, rows, tokens)
        tokens = mark_non_finite(tokens, finite)
        if log_probs is None:
            return Sampled(sequences, tokens, HostCopy(tokens))
        widest = max(p.logprobs or 0 for p in params)
        return Sampled(sequences, tokens, HostCopy(logprob_table(log_probs, tokens, widest)), widest)

    def choices(self, sampled: Sampled) -> list[TokenChoice]:
        """The sampled tokens read on the host (the step's one read), with the log-probabilities asked for."""
        if not sampled.sequences:
            return []
        values = self.to_host(sampled.copy)
        if sampled.widest is None:
            return [self._choice(seq, token) for seq, token in zip(sampled.sequences, values)]
        choices = []
        for seq, row in zip(sampled.sequences, values):
            logprobs = seq.request.params.logprobs
            token, logprob, top = unpack_logprobs(row, logprobs or 0, sampled.widest)
            wanted = token != NON_FINITE and logprobs is not None
            choices.append(TokenChoice(token, logprob, top) if wanted else self._choice(seq, token))
        return choices

    @staticmethod
    def _choice(seq: Sequence, token: int) -> TokenChoice:
        """The token sampled for ``seq``, or the error that ends it alone when its logits were not finite."""
        if token != NON_FINITE:
            return TokenChoice(token)
        adapter = seq.request.adapter
        cause = f" with adapter {adapter!r}" if adapter else ""
        return TokenChoice(None, error=f"the model's logits for this request{cause} were not finite (NaN or infinity)")


def _fed_rows(rows: Iterable[tuple[int, Sequence]], pending: Optional[Sampled]) -> list[tuple[int, int]]:
    """(row in this step, row in ``pending``'s tokens) for each of the step's rows (row, sequence) whose sequence
    ``pending`` sampled: their input tokens are still on the device."""
    if pending is None:
        return []
    return [(row, pending.rows[seq]) for row, seq in rows if seq in pending.rows]


def _tokens_of(pending: Optional[Sampled]) -> Optional[torch.Tensor]:
    return pending.tokens if pending is not None else None


def _plain_decode(seq: Sequence) -> bool:
    """Whether a decoding sequence fits the fixed decode shape: the base model, and positions equal to its cache
    index (no M-RoPE offset from images in its prompt)."""
    return seq.request.adapter is None and (seq.images is None or seq.images.delta == 0)
