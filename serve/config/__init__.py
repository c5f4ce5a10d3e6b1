"""The one place that reads the environment: ``load_settings(environ) -> Settings``."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Optional

from serve.engine.recovery import Recovery
from serve.engine.types import (
    ASYNC_SCHEDULING,
    ATTENTION_BACKENDS,
    KV_CACHE_DTYPES,
    SPECULATIVE_METHODS,
    SPECULATIVE_MODEL_METHODS,
    EngineConfig,
    GrammarLimits,
    Watermark,
)
from serve.config.parse import (
    SettingsError,
    T,
    parse_text,
    parse_adapters,
    parse_bool,
    parse_choice,
    parse_dtype,
    parse_folders,
    parse_gpu_count,
    parse_number_in,
    parse_positive_int,
    parse_seconds,
    parse_speculative,
    parse_template,
    parse_timestamp,
)


PLACEMENTS = ("auto", "shard", "replicas")
LOAD_FORMATS = ("auto", "dummy")  # dummy: random weights from config.json (benchmarks without a checkpoint)
PREFIX_CACHE_SCOPES = ("salt", "adapter", "global")  # what partitions the prefix cache: serve/front/cache_scope.py
CPU_KERNELS = ("panels", "onednn")  # panels: serve/modeling/cpu_kernel.c where it builds, else oneDNN
REASONING_PARSERS = ("auto", "none", "deepseek_r1", "qwen3", "gpt_oss")  # serve/front/chat_output.py
TOOL_CALL_PARSERS = ("auto", "json", "hermes", "llama3_json", "mistral", "pythonic", "gpt_oss")
# TGI's HF_MODEL_QUANTIZE values; serve/loading/quantize.py says which of them this server can load and where
QUANTIZATIONS = (
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "gptq",
    "awq",
    "eetq",
    "fp8",
    "compressed-tensors",
    "exl2",
    "marlin",
)
SIX_MIB = 6 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything the server is configured with, read once at start-up."""

    model_id: Optional[str] = None
    model_revision: Optional[str] = None
    hf_token: Optional[str] = field(default=None, repr=False)  # a secret: never in logs or reprs
    model_dir: str = "/opt/ml/model"
    cache_dir: str = os.path.join(os.path.expanduser("~"), ".cache", "sagemaker-llm-serve")
    num_gpus: Optional[int] = None
    messages_api_enabled: bool = False
    trust_remote_code: bool = False
    allow_unsafe_weights: bool = False
    dtype: str = "auto"
    load_format: str = "auto"  # HF_MODEL_LOAD_FORMAT: "dummy" builds the model from config.json with random weights
    chat_template: Optional[str] = None  # CHAT_TEMPLATE: Jinja text overriding the model's own chat template
    allow_image_urls: bool = False  # ALLOW_IMAGE_URLS: fetch http(s) image_url parts (else data URLs only)
    max_images_per_request: int = 8  # MAX_IMAGES_PER_REQUEST
    max_image_bytes: int = 10 * 1024 * 1024  # MAX_IMAGE_BYTES: one image's encoded size
    max_image_pixels: int = 4096 * 4096  # MAX_IMAGE_PIXELS: one image's width x height, checked before decoding
    image_fetch_timeout_s: float = 10.0  # IMAGE_FETCH_TIMEOUT_S: an http(s) image's download
    reasoning_parser: str = "auto"  # REASONING_PARSER: how thoughts are told from the answer (auto: the template)
    tool_call_parser: str = "auto"  # TOOL_CALL_PARSER: the format tool calls are read in (auto: the template)
    placement: str = "auto"
    replicas: Optional[int] = None  # engine copies under PLACEMENT=replicas (default: one per GPU; 1 on CPU)
    cuda_visible_devices: Optional[str] = None  # the GPUs this server may use (each engine process gets its own)
    tensor_parallel_size: Optional[int] = None  # TENSOR_PARALLEL_SIZE / NUM_SHARD: ranks per copy (auto: by memory)
    tensor_parallel_timeout_s: float = 300.0  # TENSOR_PARALLEL_TIMEOUT_S: a collective waiting longer fails the copy
    quantize: Optional[str] = None
    lora_adapters: tuple[tuple[str, str], ...] = ()  # (name, path) from LORA_ADAPTERS, in order
    lean_model: bool = True  # LEAN_MODEL: serve the Llama family with serve/modeling/ (false: transformers' model code)
    # the engine's limits: the same names as EngineConfig's fields, whose defaults are the only ones
    max_input_tokens: Optional[int] = EngineConfig.max_input_tokens
    max_total_tokens: Optional[int] = EngineConfig.max_total_tokens
    max_concurrent_requests: int = EngineConfig.max_concurrent_requests
    max_batch_total_tokens: Optional[int] = EngineConfig.max_batch_total_tokens
    max_batch_prefill_tokens: Optional[int] = EngineConfig.max_batch_prefill_tokens  # None: 4,096 on a GPU, else 512
    max_batch_size: Optional[int] = EngineConfig.max_batch_size
    kv_block_size: int = EngineConfig.kv_block_size  # tokens per KV-cache block
    enable_prefix_caching: bool = EngineConfig.enable_prefix_caching
    prefix_cache_scope: str = "salt"  # PREFIX_CACHE_SCOPE: requests share cached blocks within one adapter and salt
    cuda_graphs: bool = EngineConfig.cuda_graphs  # CUDA_GRAPHS: capture decode steps as CUDA graphs on a GPU
    async_scheduling: str = EngineConfig.async_scheduling  # ASYNC_SCHEDULING: auto (on CUDA), true or false
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization  # GPU_MEMORY_UTILIZATION, in (0, 1]
    kv_cache_dtype: str = EngineConfig.kv_cache_dtype  # KV_CACHE_DTYPE: auto (the model's dtype) or fp8
    attention_backend: str = EngineConfig.attention_backend  # ATTENTION_BACKEND: decode attention's kernel
    grammar_limits: GrammarLimits = EngineConfig.grammar_limits  # GRAMMAR_MAX_SIZE, _LEXER_FUEL, _MAX_LEXER_STATES
    speculative: str = EngineConfig.speculative  # SPECULATIVE: speculative decoding's proposer (off, ngram, draft)
    speculative_draft: Optional[str] = EngineConfig.speculative_draft  # SPECULATIVE=draft:<this model id or path>
    speculative_tokens: int = EngineConfig.speculative_tokens  # SPECULATIVE_TOKENS: tokens proposed per step
    speculative_ngram: int = EngineConfig.speculative_ngram  # SPECULATIVE_NGRAM: tokens the n-gram lookup matches
    watermark: Watermark = Watermark()  # WATERMARK_GAMMA, WATERMARK_DELTA: TGI's watermark parameters
    default_max_new_tokens: int = 1024
    compile: bool = False  # COMPILE: torch.compile the lean model's per-layer pieces (inductor cache in cache_dir)
    pack_cpu_weights: bool = True  # PACK_CPU_WEIGHTS: the lean model's float32 weights packed for a CPU kernel
    cpu_kernel: str = "panels"  # CPU_KERNEL: which kernel packed weights go to ("panels", else oneDNN; "onednn")
    c_compiler: Optional[str] = None  # CC: builds the panel kernel where no built library is found (else cc or gcc)
    torch_threads: Optional[int] = None  # TORCH_THREADS / OMP_NUM_THREADS: CPU compute threads; None: every core
    max_payload_bytes: int = SIX_MIB
    port: int = 8080
    workers: int = 1
    graceful_timeout: int = 25
    engine_max_restarts: int = Recovery.max_restarts  # ENGINE_MAX_RESTARTS within the window, then the worker exits
    engine_restart_window_s: float = Recovery.window_s  # ENGINE_RESTART_WINDOW_S (0: never gives up)
    engine_stall_timeout_s: float = Recovery.stall_timeout_s  # ENGINE_STALL_TIMEOUT_S: /ping 503 past it (0: off)
    api_key: Optional[str] = field(default=None, repr=False)  # when set, /v1/* and TGI routes need a Bearer token
    log_level: str = "INFO"
    metrics_dir: Optional[str] = None  # PROMETHEUS_MULTIPROC_DIR: set by gunicorn.conf.py, one per server instance
    started_at: Optional[float] = None  # when `serve` began (set by the entrypoint), for the cold-start log line
    # SageMaker-native operations (docs/sagemaker.md)
    max_lora_rank: int = 64  # MAX_LORA_RANK: adapters of a higher rank are refused
    max_lora_adapters: int = 16  # MAX_LORA_ADAPTERS: adapters loaded at once (idle ones evicted, least used first)
    max_lora_adapter_bytes: int = 1 << 30  # MAX_LORA_ADAPTER_BYTES: an adapter's weights, or its archive unpacked
    lora_adapter_roots: tuple[str, ...] = ()  # LORA_ADAPTER_ROOTS: more folders POST /adapters may read from
    stateful_sessions: bool = False  # SAGEMAKER_ENABLE_STATEFUL_SESSIONS
    sessions_expiration: int = 1200  # SAGEMAKER_SESSIONS_EXPIRATION, seconds
    max_sessions: int = 1024  # MAX_SESSIONS: live sessions at once (the one idle longest expires first, else 429)
    invocation_timeout: Optional[float] = None  # INVOCATION_TIMEOUT seconds (60 on SageMaker; None: no deadline)
    invocation_timeout_margin: float = 3.0  # INVOCATION_TIMEOUT_MARGIN: answer this many seconds before the cut
    cloudwatch_metrics: bool = False  # CLOUDWATCH_METRICS: EMF lines on stdout (on by default on SageMaker)
    cloudwatch_interval: float = 60.0  # CLOUDWATCH_METRICS_INTERVAL, seconds
    cloudwatch_namespace: str = "sagemaker-llm-serve"  # CLOUDWATCH_NAMESPACE
    endpoint_name: Optional[str] = None  # SAGEMAKER_ENDPOINT_NAME: EMF dimension
    variant_name: Optional[str] = None  # SAGEMAKER_VARIANT_NAME: EMF dimension


def on_sagemaker(environ: Mapping[str, str], opt_ml: str = "/opt/ml") -> bool:
    """True inside a SageMaker container: /opt/ml exists, or variables SageMaker and its SDK set are there."""
    names = ("SAGEMAKER_ENDPOINT_NAME", "SAGEMAKER_REGION", "SAGEMAKER_CONTAINER_LOG_LEVEL", "SAGEMAKER_PROGRAM")
    return os.path.isdir(opt_ml) or any(environ.get(name) for name in names)


def _chat_values(env: Mapping[str, str]) -> dict[str, object]:
    """How chat messages are read and answered: the template, the reasoning and tool-call parsers, and the limits on
    images (and whether http(s) images are fetched)."""
    return {
        "chat_template": _read(env, ("CHAT_TEMPLATE",), parse_template),
        "reasoning_parser": _read(env, ("REASONING_PARSER",), parse_choice(REASONING_PARSERS)),
        "tool_call_parser": _read(env, ("TOOL_CALL_PARSER",), parse_choice(TOOL_CALL_PARSERS)),
        "allow_image_urls": _read(env, ("ALLOW_IMAGE_URLS",), parse_bool),
        "max_images_per_request": _read(env, ("MAX_IMAGES_PER_REQUEST",), parse_positive_int),
        "max_image_bytes": _read(env, ("MAX_IMAGE_BYTES",), parse_positive_int),
        "max_image_pixels": _read(env, ("MAX_IMAGE_PIXELS",), parse_positive_int),
        "image_fetch_timeout_s": _read(env, ("IMAGE_FETCH_TIMEOUT_S",), parse_seconds),
    }


def _server_values(env: Mapping[str, str]) -> dict[str, object]:
    """The settings of the server's processes: port, workers, logging, metrics, and engine processes' recovery."""
    return {
        "port": _read(env, ("SAGEMAKER_BIND_TO_PORT",), parse_positive_int),
        "workers": _read(env, ("SAGEMAKER_MODEL_SERVER_WORKERS",), parse_positive_int),
        "engine_max_restarts": _read(env, ("ENGINE_MAX_RESTARTS",), parse_positive_int),
        "engine_restart_window_s": _read(env, ("ENGINE_RESTART_WINDOW_S",), parse_seconds),
        "engine_stall_timeout_s": _read(env, ("ENGINE_STALL_TIMEOUT_S",), parse_seconds),
        "log_level": _read(env, ("LOG_LEVEL",), lambda name, raw: raw.strip().upper()),
        "metrics_dir": _read(env, ("PROMETHEUS_MULTIPROC_DIR",), parse_text),
        "started_at": _read(env, ("SERVE_STARTED_AT",), parse_timestamp),
    }


def _sagemaker_values(env: Mapping[str, str]) -> dict[str, object]:
    """The settings of the SageMaker-native features; the timeout and EMF default on only on SageMaker."""
    native = on_sagemaker(env)
    timeout = _read(env, ("INVOCATION_TIMEOUT",), parse_seconds)
    timeout = (60.0 if native else None) if timeout is None else (timeout or None)
    metrics = _read(env, ("CLOUDWATCH_METRICS",), parse_bool)
    return {
        "max_lora_rank": _read(env, ("MAX_LORA_RANK",), parse_positive_int),
        "max_lora_adapters": _read(env, ("MAX_LORA_ADAPTERS",), parse_positive_int),
        "max_lora_adapter_bytes": _read(env, ("MAX_LORA_ADAPTER_BYTES",), parse_positive_int),
        "lora_adapter_roots": _read(env, ("LORA_ADAPTER_ROOTS",), parse_folders),
        "stateful_sessions": _read(env, ("SAGEMAKER_ENABLE_STATEFUL_SESSIONS",), parse_bool),
        "sessions_expiration": _read(env, ("SAGEMAKER_SESSIONS_EXPIRATION",), parse_positive_int),
        "max_sessions": _read(env, ("MAX_SESSIONS",), parse_positive_int),
        "invocation_timeout": timeout,
        "invocation_timeout_margin": _read(env, ("INVOCATION_TIMEOUT_MARGIN",), parse_seconds),
        "cloudwatch_metrics": native if metrics is None else metrics,
        "cloudwatch_interval": _read(env, ("CLOUDWATCH_METRICS_INTERVAL",), parse_seconds) or None,
        "cloudwatch_namespace": _read(env, ("CLOUDWATCH_NAMESPACE",), parse_text),
        "endpoint_name": _read(env, ("SAGEMAKER_ENDPOINT_NAME",), parse_text),
        "variant_name": _read(env, ("SAGEMAKER_VARIANT_NAME",), parse_text),
    }


def _grammar_limits(env: Mapping[str, str]) -> Optional[GrammarLimits]:
    """GRAMMAR_MAX_SIZE, GRAMMAR_LEXER_FUEL and GRAMMAR_MAX_LEXER_STATES over GrammarLimits' defaults (None: all
    unset)."""
    names = {"max_size": "MAX_SIZE", "lexer_fuel": "LEXER_FUEL", "max_lexer_states": "MAX_LEXER_STATES"}
    values = {field: _read(env, (f"GRAMMAR_{name}",), parse_positive_int) for field, name in names.items()}
    chosen = {field: value for field, value in values.items() if value is not None}
    return GrammarLimits(**chosen) if chosen else None


def _watermark(env: Mapping[str, str]) -> Optional[Watermark]:
    """TGI's WATERMARK_GAMMA (the green share) and WATERMARK_DELTA (its bias) over Watermark's defaults (None: both
    unset)."""
    gamma = _read(env, ("WATERMARK_GAMMA",), parse_number_in(0.0, 1.0, above_low=True))
    delta = _read(env, ("WATERMARK_DELTA",), parse_number_in(0.0, 100.0))
    if gamma is None and delta is None:
        return None
    return Watermark(Watermark.gamma if gamma is None else gamma, Watermark.delta if delta is None else delta)


def _read(environ: Mapping[str, str], names: tuple, parse: Callable[[str, str], T]) -> Optional[T]:
    """The first of ``names`` that is set (non-empty), parsed; None when none is."""
    for name in names:
        raw = environ.get(name)
        if raw is not None and raw.strip() != "":
            return parse(name, raw)
    return None


_SPAWN_LOCK = threading.Lock()


@contextlib.contextmanager
def child_environment(overrides: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``overrides`` while a child process is spawned (a spawned child copies the environment
    as it starts: CUDA_VISIBLE_DEVICES then binds an engine process to its GPUs before it imports torch)."""
    with _SPAWN_LOCK:
        saved = {name: os.environ.get(name) for name in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _placement_values(env: Mapping[str, str]) -> dict[str, object]:
    """Where the model goes (GPUs, copies, tensor parallelism) and how its steps are sped up (speculation)."""
    return {
        "placement": _read(env, ("PLACEMENT",), parse_choice(PLACEMENTS)),
        "replicas": _read(env, ("REPLICAS",), parse_positive_int),
        "cuda_visible_devices": _read(env, ("CUDA_VISIBLE_DEVICES",), parse_text),
        "tensor_parallel_size": _read(env, ("TENSOR_PARALLEL_SIZE", "NUM_SHARD"), parse_positive_int),
        "tensor_parallel_timeout_s": _read(env, ("TENSOR_PARALLEL_TIMEOUT_S",), parse_seconds),
        **_speculative_method(env),
        "speculative_tokens": _read(env, ("SPECULATIVE_TOKENS",), parse_positive_int),
        "speculative_ngram": _read(env, ("SPECULATIVE_NGRAM",), parse_positive_int),
    }


def _speculative_method(env: Mapping[str, str]) -> dict[str, object]:
    """SPECULATIVE: the proposer, and the draft model of ``draft:<model id or path>``."""
    chosen = _read(env, ("SPECULATIVE",), parse_speculative(SPECULATIVE_METHODS, SPECULATIVE_MODEL_METHODS))
    method, model = chosen or (None, None)
    return {"speculative": method, "speculative_draft": model}


def load_settings(environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Build Settings from the environment (``os.environ`` by default); raise SettingsError if malformed."""
    env = os.environ if environ is None else environ
    values = {
        "model_id": _read(env, ("HF_MODEL_ID",), parse_text),
        "model_revision": _read(env, ("HF_MODEL_REVISION",), parse_text),
        "hf_token": _read(env, ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), parse_text),
        "model_dir": _read(env, ("SM_MODEL_DIR",), parse_text),
        "cache_dir": _read(env, ("SERVE_CACHE_DIR",), parse_text),
        "num_gpus": _read(env, ("SM_NUM_GPUS",), parse_gpu_count),
        "messages_api_enabled": _read(env, ("MESSAGES_API_ENABLED",), parse_bool),
        "trust_remote_code": _read(env, ("HF_MODEL_TRUST_REMOTE_CODE",), parse_bool),
        "allow_unsafe_weights": _read(env, ("ALLOW_PICKLE_WEIGHTS", "HF_MODEL_ALLOW_UNSAFE_WEIGHTS"), parse_bool),
        "api_key": _read(env, ("API_KEY",), parse_text),
        "dtype": _read(env, ("DTYPE",), parse_dtype),
        "load_format": _read(env, ("HF_MODEL_LOAD_FORMAT",), parse_choice(LOAD_FORMATS)),
        "quantize": _read(env, ("HF_MODEL_QUANTIZE",), parse_choice(QUANTIZATIONS)),
        "lora_adapters": _read(env, ("LORA_ADAPTERS",), parse_adapters),
        "lean_model": _read(env, ("LEAN_MODEL",), parse_bool),
        "max_input_tokens": _read(env, ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH"), parse_positive_int),
        "max_total_tokens": _read(env, ("MAX_TOTAL_TOKENS",), parse_positive_int),
        "max_concurrent_requests": _read(env, ("MAX_CONCURRENT_REQUESTS",), parse_positive_int),
        "default_max_new_tokens": _read(env, ("DEFAULT_MAX_NEW_TOKENS",), parse_positive_int),
        "max_batch_total_tokens": _read(env, ("MAX_BATCH_TOTAL_TOKENS",), parse_positive_int),
        "max_batch_prefill_tokens": _read(env, ("MAX_BATCH_PREFILL_TOKENS",), parse_positive_int),
        "max_batch_size": _read(env, ("MAX_BATCH_SIZE",), parse_positive_int),
        "kv_block_size": _read(env, ("KV_BLOCK_SIZE",), parse_positive_int),
        "enable_prefix_caching": _read(env, ("ENABLE_PREFIX_CACHING",), parse_bool),
        "prefix_cache_scope": _read(env, ("PREFIX_CACHE_SCOPE",), parse_choice(PREFIX_CACHE_SCOPES)),
        "cuda_graphs": _read(env, ("CUDA_GRAPHS",), parse_bool),
        "async_scheduling": _read(env, ("ASYNC_SCHEDULING",), parse_choice(ASYNC_SCHEDULING)),
        "gpu_memory_utilization": _read(env, ("GPU_MEMORY_UTILIZATION",), parse_number_in(0.0, 1.0, above_low=True)),
        "kv_cache_dtype": _read(env, ("KV_CACHE_DTYPE",), parse_choice(KV_CACHE_DTYPES)),
        "attention_backend": _read(env, ("ATTENTION_BACKEND",), parse_choice(ATTENTION_BACKENDS)),
        "grammar_limits": _grammar_limits(env),
        "watermark": _watermark(env),
        "compile": _read(env, ("COMPILE",), parse_bool),
        "pack_cpu_weights": _read(env, ("PACK_CPU_WEIGHTS",), parse_bool),
        "cpu_kernel": _read(env, ("CPU_KERNEL",), parse_choice(CPU_KERNELS)),
        "c_compiler": _read(env, ("CC",), parse_text),
        "torch_threads": _read(env, ("TORCH_THREADS", "OMP_NUM_THREADS"), parse_positive_int),
        **_placement_values(env),
        **_chat_values(env),
        **_server_values(env),
        **_sagemaker_values(env),
    }
    settings = Settings(**{key: value for key, value in values.items() if value is not None})
    _check_limits(settings)
    return settings


def _check_limits(settings: Settings) -> None:
    """Cross-field checks that a single variable cannot express."""
    if settings.max_input_tokens and settings.max_total_tokens:
        if settings.max_input_tokens >= settings.max_total_tokens:
            raise SettingsError(
                f"MAX_INPUT_TOKENS={settings.max_input_tokens} must be less than "
                f"MAX_TOTAL_TOKENS={settings.max_total_tokens}"
            )
    if settings.replicas is not None and settings.placement == "shard":
        raise SettingsError(f"REPLICAS={settings.replicas} cannot be combined with PLACEMENT=shard (one sharded copy)")
    if (settings.tensor_parallel_size or 1) > 1 and settings.placement in ("shard", "replicas"):
        raise SettingsError(
            f"TENSOR_PARALLEL_SIZE={settings.tensor_parallel_size} cannot be combined with "
            f"PLACEMENT={settings.placement} (leave PLACEMENT=auto)"
        )
    if settings.stateful_sessions and settings.workers > 1:
        raise SettingsError(
            f"SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true needs SAGEMAKER_MODEL_SERVER_WORKERS=1, not {settings.workers}: "
            "a session and its KV cache live in one worker"
        )
    timeout = settings.invocation_timeout
    if timeout is not None and timeout <= settings.invocation_timeout_margin:
        raise SettingsError(
            f"INVOCATION_TIMEOUT={timeout:g} must be greater than "
            f"INVOCATION_TIMEOUT_MARGIN={settings.invocation_timeout_margin:g}"
        )
    if settings.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise SettingsError(f"LOG_LEVEL={settings.log_level!r} is not a logging level")
