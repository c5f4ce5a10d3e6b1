"""serve/config: every variable parsed into its setting, aliases and their precedence, bounds, and errors that
name the variable."""

import dataclasses

import pytest

from serve.config import Settings, SettingsError, load_settings
from serve.engine.types import EngineConfig, GrammarLimits, Watermark
from serve.wiring import engine_config

# (variable, what a user writes, the setting, its parsed value): every value differs from the setting's default
VARIABLES = [
    ("HF_MODEL_ID", " org/model ", "model_id", "org/model"),
    ("HF_MODEL_REVISION", "abc123", "model_revision", "abc123"),
    ("HF_TOKEN", "hf_x", "hf_token", "hf_x"),
    ("SM_MODEL_DIR", "/models/here", "model_dir", "/models/here"),
    ("SERVE_CACHE_DIR", "/cache/here", "cache_dir", "/cache/here"),
    ("SM_NUM_GPUS", "1", "num_gpus", 1),  # json.dumps(1), as the reference deploy snippet sends it
    ("MESSAGES_API_ENABLED", "True", "messages_api_enabled", True),  # str(True), as our deploy scripts send it
    ("HF_MODEL_TRUST_REMOTE_CODE", "1", "trust_remote_code", True),
    ("ALLOW_PICKLE_WEIGHTS", "yes", "allow_unsafe_weights", True),
    ("API_KEY", " k-123456 ", "api_key", "k-123456"),
    ("DTYPE", "BFloat16", "dtype", "bfloat16"),
    ("HF_MODEL_LOAD_FORMAT", "Dummy", "load_format", "dummy"),
    ("CHAT_TEMPLATE", "{{ messages[0].content }}", "chat_template", "{{ messages[0].content }}"),
    ("REASONING_PARSER", "DeepSeek_R1", "reasoning_parser", "deepseek_r1"),
    ("TOOL_CALL_PARSER", "pythonic", "tool_call_parser", "pythonic"),
    ("ALLOW_IMAGE_URLS", "true", "allow_image_urls", True),
    ("MAX_IMAGES_PER_REQUEST", "3", "max_images_per_request", 3),
    ("MAX_IMAGE_BYTES", "1048576", "max_image_bytes", 1048576),
    ("MAX_IMAGE_PIXELS", "1000000", "max_image_pixels", 1000000),
    ("IMAGE_FETCH_TIMEOUT_S", "2.5", "image_fetch_timeout_s", 2.5),
    ("PLACEMENT", "Replicas", "placement", "replicas"),
    ("REPLICAS", "2", "replicas", 2),
    ("TENSOR_PARALLEL_SIZE", "4", "tensor_parallel_size", 4),
    ("TENSOR_PARALLEL_TIMEOUT_S", "90", "tensor_parallel_timeout_s", 90.0),
    ("CUDA_VISIBLE_DEVICES", "2,3", "cuda_visible_devices", "2,3"),
    ("HF_MODEL_QUANTIZE", "bitsandbytes-NF4", "quantize", "bitsandbytes-nf4"),
    ("LORA_ADAPTERS", "sql=/a/sql, chat = /b/chat,", "lora_adapters", (("sql", "/a/sql"), ("chat", "/b/chat"))),
    ("LEAN_MODEL", "false", "lean_model", False),
    ("MAX_INPUT_TOKENS", "1024", "max_input_tokens", 1024),
    ("MAX_TOTAL_TOKENS", "2048", "max_total_tokens", 2048),
    ("MAX_CONCURRENT_REQUESTS", " 16 ", "max_concurrent_requests", 16),
    ("DEFAULT_MAX_NEW_TOKENS", "64", "default_max_new_tokens", 64),
    ("MAX_BATCH_TOTAL_TOKENS", "8192", "max_batch_total_tokens", 8192),
    ("MAX_BATCH_PREFILL_TOKENS", "256", "max_batch_prefill_tokens", 256),
    ("MAX_BATCH_SIZE", "4", "max_batch_size", 4),
    ("KV_BLOCK_SIZE", "32", "kv_block_size", 32),
    ("ENABLE_PREFIX_CACHING", "off", "enable_prefix_caching", False),
    ("PREFIX_CACHE_SCOPE", "Global", "prefix_cache_scope", "global"),
    ("CUDA_GRAPHS", "No", "cuda_graphs", False),
    ("ATTENTION_BACKEND", " Triton ", "attention_backend", "triton"),
    ("GPU_MEMORY_UTILIZATION", "0.75", "gpu_memory_utilization", 0.75),
    ("KV_CACHE_DTYPE", " FP8 ", "kv_cache_dtype", "fp8"),
    ("SPECULATIVE", " NGram ", "speculative", "ngram"),
    ("SPECULATIVE", "draft:org/Small-LM", "speculative_draft", "org/Small-LM"),
    ("SPECULATIVE", "EAGLE3:/heads/eagle3", "speculative", "eagle3"),
    ("SPECULATIVE_TOKENS", "6", "speculative_tokens", 6),
    ("SPECULATIVE_NGRAM", "2", "speculative_ngram", 2),
    ("GRAMMAR_LEXER_FUEL", "5000", "grammar_limits", GrammarLimits(lexer_fuel=5000)),
    ("WATERMARK_DELTA", "1.5", "watermark", Watermark(delta=1.5)),
    ("COMPILE", "on", "compile", True),
    ("ASYNC_SCHEDULING", "False", "async_scheduling", "false"),
    ("PACK_CPU_WEIGHTS", "0", "pack_cpu_weights", False),
    ("CPU_KERNEL", "oneDNN", "cpu_kernel", "onednn"),
    ("CC", " clang ", "c_compiler", "clang"),
    ("TORCH_THREADS", "3", "torch_threads", 3),
    ("SAGEMAKER_BIND_TO_PORT", "9000", "port", 9000),
    ("SAGEMAKER_MODEL_SERVER_WORKERS", "2", "workers", 2),
    ("ENGINE_MAX_RESTARTS", "5", "engine_max_restarts", 5),
    ("ENGINE_RESTART_WINDOW_S", "120", "engine_restart_window_s", 120.0),
    ("ENGINE_STALL_TIMEOUT_S", "off", "engine_stall_timeout_s", 0.0),
    ("LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("PROMETHEUS_MULTIPROC_DIR", "/metrics/here", "metrics_dir", "/metrics/here"),
    ("SERVE_STARTED_AT", "12.5", "started_at", 12.5),
    ("MAX_LORA_RANK", "16", "max_lora_rank", 16),
    ("MAX_LORA_ADAPTERS", "4", "max_lora_adapters", 4),
    ("MAX_LORA_ADAPTER_BYTES", "1048576", "max_lora_adapter_bytes", 1048576),
    ("LORA_ADAPTER_ROOTS", "/srv/adapters,/data", "lora_adapter_roots", ("/srv/adapters", "/data")),
    ("SAGEMAKER_ENABLE_STATEFUL_SESSIONS", "TRUE", "stateful_sessions", True),
    ("SAGEMAKER_SESSIONS_EXPIRATION", "60", "sessions_expiration", 60),
    ("MAX_SESSIONS", "5", "max_sessions", 5),
    ("INVOCATION_TIMEOUT", "30", "invocation_timeout", 30.0),
    ("INVOCATION_TIMEOUT_MARGIN", "0.5", "invocation_timeout_margin", 0.5),
    ("CLOUDWATCH_METRICS", "1", "cloudwatch_metrics", True),
    ("CLOUDWATCH_METRICS_INTERVAL", "10", "cloudwatch_interval", 10.0),
    ("CLOUDWATCH_NAMESPACE", "team-llm", "cloudwatch_namespace", "team-llm"),
    ("SAGEMAKER_ENDPOINT_NAME", "chat", "endpoint_name", "chat"),
    ("SAGEMAKER_VARIANT_NAME", "AllTraffic", "variant_name", "AllTraffic"),
]
NOT_FROM_THE_ENVIRONMENT = {"max_payload_bytes", "graceful_timeout"}


@pytest.mark.parametrize("variable, raw, name, parsed", VARIABLES)
def test_each_variable_is_parsed_into_its_setting(variable, raw, name, parsed):
    assert parsed != getattr(Settings(), name), "a row must show parsing, not the default"
    assert getattr(load_settings({variable: raw}), name) == parsed


def test_every_setting_but_the_fixed_ones_comes_from_a_variable():
    read = {name for _, _, name, _ in VARIABLES}
    assert read == {field.name for field in dataclasses.fields(Settings)} - NOT_FROM_THE_ENVIRONMENT


def test_no_environment_and_empty_values_give_the_defaults():
    assert load_settings({}) == Settings()
    assert load_settings({"HF_MODEL_ID": "", "SM_NUM_GPUS": " ", "COMPILE": "  "}) == Settings()


@pytest.mark.parametrize(
    "primary, alias, name, primary_raw, alias_raw, primary_value, alias_value",
    [
        ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "hf_token", "a", "b", "a", "b"),
        ("ALLOW_PICKLE_WEIGHTS", "HF_MODEL_ALLOW_UNSAFE_WEIGHTS", "allow_unsafe_weights", "false", "true", False, True),
        ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", "max_input_tokens", "77", "99", 77, 99),
        ("TORCH_THREADS", "OMP_NUM_THREADS", "torch_threads", "1", "3", 1, 3),
        ("TENSOR_PARALLEL_SIZE", "NUM_SHARD", "tensor_parallel_size", "2", "4", 2, 4),
    ],
)
def test_an_alias_counts_alone_and_the_primary_name_wins(
    primary, alias, name, primary_raw, alias_raw, primary_value, alias_value
):
    assert getattr(load_settings({alias: alias_raw}), name) == alias_value
    assert getattr(load_settings({primary: primary_raw, alias: alias_raw}), name) == primary_value
    assert getattr(load_settings({primary: " ", alias: alias_raw}), name) == alias_value  # empty is unset


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "1", "yes", "on", " true "])
def test_true_spellings(raw):
    assert load_settings({"MESSAGES_API_ENABLED": raw}).messages_api_enabled is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "no", "OFF"])
def test_false_spellings(raw):
    assert load_settings({"CUDA_GRAPHS": raw}).cuda_graphs is False


@pytest.mark.parametrize(
    "raw, message",
    [
        ("0", "must be greater than 0"),
        ("-5", "must be greater than 0"),
        ("1.5", "is not an integer"),
        ("1e3", "is not an integer"),
        ("lots", "is not an integer"),
    ],
)
def test_counts_are_positive_integers(raw, message):
    with pytest.raises(SettingsError, match=f"^MAX_BATCH_SIZE={raw!r} {message}"):
        load_settings({"MAX_BATCH_SIZE": raw})


def test_a_gpu_count_may_be_zero_for_the_cpu_but_not_negative():
    assert load_settings({"SM_NUM_GPUS": "0"}).num_gpus == 0
    with pytest.raises(SettingsError, match="SM_NUM_GPUS='-1' must be greater than 0"):
        load_settings({"SM_NUM_GPUS": "-1"})


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SM_NUM_GPUS": "abc"}, "SM_NUM_GPUS='abc' is not an integer"),
        ({"MESSAGES_API_ENABLED": "maybe"}, "MESSAGES_API_ENABLED='maybe' is not a boolean"),
        ({"ALLOW_PICKLE_WEIGHTS": "perhaps"}, "ALLOW_PICKLE_WEIGHTS='perhaps' is not a boolean"),
        ({"HF_MODEL_ALLOW_UNSAFE_WEIGHTS": "sure"}, "HF_MODEL_ALLOW_UNSAFE_WEIGHTS='sure' is not a boolean"),
        ({"MAX_INPUT_LENGTH": "-2"}, "MAX_INPUT_LENGTH='-2' must be greater than 0"),
        ({"OMP_NUM_THREADS": "two"}, "OMP_NUM_THREADS='two' is not an integer"),
        ({"DTYPE": "float8"}, "DTYPE='float8' is not one of auto, float32, bfloat16, float16"),
        ({"HF_MODEL_LOAD_FORMAT": "gguf"}, "HF_MODEL_LOAD_FORMAT='gguf' is not one of auto, dummy"),
        ({"CPU_KERNEL": "fast"}, "CPU_KERNEL='fast' is not one of panels, onednn"),
        ({"KV_CACHE_DTYPE": "int8"}, "KV_CACHE_DTYPE='int8' is not one of auto, fp8"),
        ({"GPU_MEMORY_UTILIZATION": "0"}, "GPU_MEMORY_UTILIZATION='0' must be in (0, 1]"),
        ({"GPU_MEMORY_UTILIZATION": "1.2"}, "GPU_MEMORY_UTILIZATION='1.2' must be in (0, 1]"),
        ({"PLACEMENT": "spread"}, "PLACEMENT='spread' is not one of auto, shard, replicas"),
        ({"HF_MODEL_QUANTIZE": "int3"}, "HF_MODEL_QUANTIZE='int3' is not one of"),
        ({"LORA_ADAPTERS": "sql"}, "LORA_ADAPTERS: 'sql' is not of the form adapter_name=path"),
        ({"LORA_ADAPTERS": "a=/x,a=/y"}, "LORA_ADAPTERS: adapter 'a' is listed twice"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL='LOUD' is not a logging level"),
        ({"SERVE_STARTED_AT": "yesterday"}, "SERVE_STARTED_AT='yesterday' is not a Unix timestamp"),
        ({"INVOCATION_TIMEOUT": "nan"}, "INVOCATION_TIMEOUT='nan' must be 0"),
        ({"CLOUDWATCH_METRICS_INTERVAL": "-1"}, "CLOUDWATCH_METRICS_INTERVAL='-1' must be 0"),
        ({"CHAT_TEMPLATE": "no braces here"}, "CHAT_TEMPLATE='no braces here' is neither a Jinja template"),
    ],
)
def test_malformed_values_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(env)


@pytest.mark.parametrize(
    "env, fixed, message",
    [
        (
            {"MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "100"},
            {"MAX_INPUT_TOKENS": "99"},
            "MAX_INPUT_TOKENS=100 must be less than MAX_TOTAL_TOKENS=100",
        ),
        ({"PLACEMENT": "shard", "REPLICAS": "2"}, {"PLACEMENT": "replicas"}, "REPLICAS=2 cannot be combined"),
        ({"PLACEMENT": "shard", "NUM_SHARD": "2"}, {"PLACEMENT": "auto"}, "TENSOR_PARALLEL_SIZE=2 cannot be combined"),
        (
            {"SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"},
            {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"},
            "SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true needs SAGEMAKER_MODEL_SERVER_WORKERS=1, not 2",
        ),
        (
            {"INVOCATION_TIMEOUT": "5", "INVOCATION_TIMEOUT_MARGIN": "5"},
            {"INVOCATION_TIMEOUT_MARGIN": "4.5"},
            "INVOCATION_TIMEOUT=5 must be greater than INVOCATION_TIMEOUT_MARGIN=5",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_refused(env, fixed, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(env)
    load_settings({**env, **fixed})  # one of them changed: accepted


def test_the_engine_gets_its_limits_and_takes_its_defaults_from_one_place():
    env = {
        "MAX_CONCURRENT_REQUESTS": "6",
        "MAX_TOTAL_TOKENS": "300",
        "MAX_INPUT_TOKENS": "200",
        "MAX_BATCH_TOTAL_TOKENS": "4096",
        "MAX_BATCH_PREFILL_TOKENS": "64",
        "MAX_BATCH_SIZE": "3",
        "KV_BLOCK_SIZE": "8",
        "ENABLE_PREFIX_CACHING": "false",
        "CUDA_GRAPHS": "false",
    }
    assert engine_config(load_settings(env)) == EngineConfig(
        max_concurrent_requests=6,
        max_total_tokens=300,
        max_input_tokens=200,
        max_batch_total_tokens=4096,
        max_batch_prefill_tokens=64,
        max_batch_size=3,
        kv_block_size=8,
        enable_prefix_caching=False,
        cuda_graphs=False,
    )
    assert engine_config(Settings()) == EngineConfig()


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings({}).port = 1


def test_secrets_are_not_in_the_settings_repr():
    settings = load_settings({"API_KEY": "k-123456", "HF_TOKEN": "hf_abcdef123"})
    assert settings.hf_token == "hf_abcdef123"
    assert "k-123456" not in repr(settings) and "hf_abcdef123" not in repr(settings)


def test_chat_template_is_an_existing_file_whatever_its_name_or_jinja_text(tmp_path):
    braces = tmp_path / "template{v2}.jinja"
    braces.write_text("{{ messages[0]['content'] }}")
    assert load_settings({"CHAT_TEMPLATE": str(braces)}).chat_template == "{{ messages[0]['content'] }}"
    for value in (str(tmp_path / "missing{1}.jinja"), str(tmp_path / "missing.jinja")):
        with pytest.raises(SettingsError, match="CHAT_TEMPLATE=.*neither a Jinja template"):
            load_settings({"CHAT_TEMPLATE": value})
