"""Plain data passed between the HTTP side and the engine thread."""

from __future__ import annotations

import enum
import time
import uuid
from dataclasses import astuple, dataclass, field
from typing import Any, Optional


class FinishReason(str, enum.Enum):
    """Why a sequence stopped; values are the OpenAI finish reasons where one exists."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # the model raised


@dataclass(frozen=True)
class Watermark:
    """TGI's green-list watermark (serve/engine/watermark.py): the green share of the vocabulary and its bias."""

    gamma: float = 0.5  # WATERMARK_GAMMA
    delta: float = 2.0  # WATERMARK_DELTA


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop; validated at the edge, trusted here."""

    max_new_tokens: int = 16  # 0: score the prompt only (prompt_logprobs), finish after prefill without a token
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one
    typical_p: float = 1.0  # locally typical sampling mass (1.0: off)
    logprobs: Optional[int] = None  # None: none; k: the chosen token's log-probability and the k most likely
    prompt_logprobs: bool = False  # also the log-probability of every prompt token (TGI decoder_input_details)
    grammar: Optional[str] = None  # a checked llguidance grammar the output must follow
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits before sampling
    watermark: Optional[Watermark] = None  # TGI's ``watermark``: bias each step's green list of tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GrammarLimits:
    """What compiling one grammar may cost (llguidance's parser limits; the settings of the same names with a
    ``GRAMMAR_`` prefix, docs/reliability.md): a grammar past one is refused before it is admitted."""

    max_size: int = 200_000  # symbols in the grammar's productions (compile work and memory)
    lexer_fuel: int = 100_000  # work building the lexer's first regexes (about 50 per microsecond: ~2-10 ms)
    max_lexer_states: int = 20_000  # lexer states, 1-2 kB each: what a matcher may hold in memory


ATTENTION_BACKENDS = ("auto", "triton", "flashinfer", "sdpa", "cpu")  # ATTENTION_BACKEND: engine/decode_backends.py
ASYNC_SCHEDULING = ("auto", "true", "false")  # ASYNC_SCHEDULING: auto is on for a model on CUDA (engine/ahead.py)
KV_CACHE_DTYPES = ("auto", "fp8")  # KV_CACHE_DTYPE: the model's dtype, or float8 e4m3 scaled (engine/kv_cache.py)
SPECULATIVE_METHODS = ("off", "ngram", "draft", "eagle3")  # SPECULATIVE: the proposer (engine/speculative.py)
SPECULATIVE_MODEL_METHODS = ("draft", "eagle3")  # the methods that name a model: draft:<model id or path>


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits (TGI's names): None means derived from the model and free memory at load time. The defaults
    here are the only ones: the settings of the same names take theirs from this class."""

    max_concurrent_requests: int = 128
    max_total_tokens: Optional[int] = None
    max_input_tokens: Optional[int] = None
    max_batch_total_tokens: Optional[int] = None
    max_batch_prefill_tokens: Optional[int] = None  # None: by the model's device (prefill_token_budget)
    max_batch_size: Optional[int] = None
    kv_block_size: int = 16
    enable_prefix_caching: bool = True
    cuda_graphs: bool = True  # capture decode shapes as CUDA graphs (ignored without CUDA)
    async_scheduling: str = "auto"  # ASYNC_SCHEDULING: plan step N+1 while N runs (serve/engine/ahead.py)
    gpu_memory_utilization: float = 0.9  # GPU_MEMORY_UTILIZATION: the share of GPU memory the server may use
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPE: "auto" (the model's dtype) or "fp8" (float8 e4m3, scaled)
    attention_backend: str = "auto"  # ATTENTION_BACKEND: decode attention's kernel (serve/engine/decode_backends.py)
    c_compiler: Optional[str] = None  # CC: builds the CPU attention kernel where no built library is found
    compile_cache_dir: Optional[str] = None  # COMPILE: torch.compile the lean model's layers, inductor cache here
    grammar_limits: GrammarLimits = GrammarLimits()  # GRAMMAR_MAX_SIZE, GRAMMAR_LEXER_FUEL, GRAMMAR_MAX_LEXER_STATES
    speculative: str = "off"  # SPECULATIVE: the proposer of speculative decoding (serve/engine/speculative.py)
    speculative_tokens: int = 4  # SPECULATIVE_TOKENS: tokens proposed per step (k)
    speculative_ngram: int = 3  # SPECULATIVE_NGRAM: tokens the n-gram proposer matches (n)
    speculative_draft: Optional[str] = None  # SPECULATIVE=draft:<model id or path>: the draft model's source


CPU_PREFILL_TOKENS = 512  # MAX_BATCH_PREFILL_TOKENS when not set, the model on the CPU
GPU_PREFILL_TOKENS = 4096  # the same on a GPU: a step's prompt tokens repay its read of the weights


def prefill_token_budget(configured: Optional[int], device: Any) -> int:
    """Prompt tokens one step may prefill: MAX_BATCH_PREFILL_TOKENS when set, else the default for ``device``."""
    if configured is not None:
        return configured
    return GPU_PREFILL_TOKENS if getattr(device, "type", None) == "cuda" else CPU_PREFILL_TOKENS


CONTEXT_CAP = 4096  # tokens a sequence may hold when max_total_tokens is not set and the model allows more


def total_token_limit(max_context: int, max_total_tokens: Optional[int] = None) -> int:
    """Tokens one sequence may hold, prompt and output: ``max_total_tokens`` when set, else the model's context
    capped at CONTEXT_CAP; never more than the model's context."""
    return min(max_total_tokens or min(max_context, CONTEXT_CAP), max_context)


@dataclass(frozen=True)
class ImageInputs:
    """A prompt's images as the model's image processor made them: its arrays (``pixel_values`` and what else the
    model's ``get_image_features`` takes), the placeholder token whose positions the images' features fill, in order,
    and a digest of each image (prefix-cache keys name them)."""

    arrays: dict[str, Any]
    token_id: int
    digests: tuple[str, ...]


@dataclass
class Request:
    """One generation request: prompt token ids plus sampling parameters."""

    prompt_ids: list[int]
    params: SamplingParams
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    adapter: Optional[str] = None  # a LoRA adapter's name; None is the base model
    session_id: Optional[str] = None  # a live SageMaker stateful session: its conversation's KV blocks stay pinned
    cache_salt: Optional[str] = None  # the prefix-cache partition: blocks are shared only within one salt
    images: Optional[ImageInputs] = None  # a vision-language model's images, filling the prompt's image tokens
    arrival: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Timings:
    """Where a request's time went, in seconds."""

    queue: float
    prefill: float
    decode: float

    @property
    def total(self) -> float:
        return self.queue + self.prefill + self.decode


@dataclass(frozen=True)
class TokenChoice:
    """A sampled token with, when asked for, its log-probability and the most likely alternatives."""

    token_id: Optional[int]  # None only in a scoring request's one event, which samples no token
    logprob: Optional[float] = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    error: Optional[str] = None  # set when the row cannot be sampled (non-finite logits): the sequence ends with it


@dataclass(frozen=True)
class TokenEvent:
    """One generated token (``text`` is the new, printable text it completes) or the end of a request.

    The last event of every request has ``finish_reason`` set; it may also carry a final token.
    """

    token_id: Optional[int]
    text: str
    finish_reason: Optional[FinishReason] = None
    generated_tokens: int = 0
    prompt_tokens: int = 0
    timings: Optional[Timings] = None
    error: Optional[str] = None
    stop_sequence: Optional[str] = None
    logprob: Optional[float] = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: Optional[tuple[Optional[float], ...]] = None  # first event only, when asked for
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    prompt_top_logprobs: Optional[tuple[tuple[tuple[int, float], ...], ...]] = None  # with it: the likeliest

    @classmethod
    def ending(cls, request: "Request", reason: FinishReason, error: Optional[str] = None) -> "TokenEvent":
        """The final event of a request that ends before it produced a token (cancelled while waiting, failed)."""
        return cls(None, "", reason, 0, len(request.prompt_ids), error=error)


@dataclass(frozen=True)
class Limits:
    """Token limits in force once the model is loaded."""

    max_input_tokens: int
    max_total_tokens: int
    max_batch_total_tokens: int  # tokens the KV pool holds
    max_batch_size: int  # sequences that may run at once
    kv_block_size: int = EngineConfig.kv_block_size
    kv_blocks: int = 0  # blocks in the pool (scratch excluded)
    max_batch_prefill_tokens: int = CPU_PREFILL_TOKENS  # prompt tokens a step may prefill (prefill_token_budget)


# a decode graph's replay, the fixed decode shape run eagerly, the rest eagerly, a step with prompt chunks replayed
# piecewise (serve/engine/piecewise.py)
STEP_PATHS = ("graph", "fixed_shape", "eager", "piecewise")


@dataclass
class EngineStats:
    """The KV pool, the prefix cache and the engine thread's work, for /metrics (summed over a pool's engines)."""

    blocks_used: int = 0
    blocks_total: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    preemptions: int = 0
    peak_running: int = 0
    steps: int = 0
    busy_seconds: float = 0.0  # time the engine thread spent in steps (its busy share: this over wall time)
    restarts: int = 0  # engine processes started again after one died
    speculative_proposer: str = ""  # SPECULATIVE's proposer ("": off)
    speculative_proposed: int = 0  # tokens proposed and verified
    speculative_accepted: int = 0  # of those, tokens accepted
    speculative_lengths: tuple[int, ...] = ()  # verified proposals by accepted length (index: tokens accepted)
    step_paths: tuple[int, ...] = ()  # steps by path, in STEP_PATHS' order
    steps_ahead: int = 0  # steps launched while the step before them was still in flight (ASYNC_SCHEDULING)

    def __add__(self, other: "EngineStats") -> "EngineStats":
        return EngineStats(*(_combine(a, b) for a, b in zip(astuple(self), astuple(other))))


def _combine(a: Any, b: Any) -> Any:
    """Two engines' values of one stat: numbers add, histograms add bucket by bucket, a name is either's."""
    if isinstance(a, str):
        return a or b
    if isinstance(a, tuple):
        longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
        return tuple(value + (shorter[index] if index < len(shorter) else 0) for index, value in enumerate(longer))
    return a + b


@dataclass(frozen=True)
class EngineLoad:
    """One engine (one copy of the model) as /info shows it: its load and what start-up did about CUDA graphs,
    COMPILE and decode attention."""

    in_flight: int
    served: int
    graphs: Any = None  # serve.engine.graphs.GraphReport once loaded
    compiled: Any = None  # serve.engine.compile.CompileReport once loaded
    attention: Any = None  # serve.engine.decode_backends.AttentionReport once loaded
    ahead: Any = None  # serve.engine.ahead.AheadReport: whether the host works ahead of the device
