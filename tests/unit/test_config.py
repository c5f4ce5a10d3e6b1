import dataclasses

import pytest

from serve.config import Settings, SettingsError, load_settings


def test_defaults_need_no_environment():
    settings = load_settings({})
    assert settings == Settings()
    assert settings.port == 8080 and settings.max_concurrent_requests == 128
    assert settings.model_id is None and settings.messages_api_enabled is False and settings.dtype == "auto"


@pytest.mark.parametrize("raw", ["true", "True", "TRUE", "1", "yes", " true "])
def test_true_spellings(raw):
    assert load_settings({"MESSAGES_API_ENABLED": raw}).messages_api_enabled is True


@pytest.mark.parametrize("raw", ["false", "False", "0", "no"])
def test_false_spellings(raw):
    assert load_settings({"MESSAGES_API_ENABLED": raw}).messages_api_enabled is False


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"SM_NUM_GPUS": "abc"}, "SM_NUM_GPUS"),
        ({"SM_NUM_GPUS": "-1"}, "SM_NUM_GPUS"),
        ({"MESSAGES_API_ENABLED": "maybe"}, "MESSAGES_API_ENABLED"),
        ({"HF_MODEL_TRUST_REMOTE_CODE": "sure"}, "HF_MODEL_TRUST_REMOTE_CODE"),
        ({"MAX_INPUT_TOKENS": "-5"}, "MAX_INPUT_TOKENS"),
        ({"MAX_TOTAL_TOKENS": "1.5"}, "MAX_TOTAL_TOKENS"),
        ({"MAX_CONCURRENT_REQUESTS": "lots"}, "MAX_CONCURRENT_REQUESTS"),
        ({"DTYPE": "float8"}, "DTYPE"),
        ({"SAGEMAKER_BIND_TO_PORT": "http"}, "SAGEMAKER_BIND_TO_PORT"),
        ({"MAX_INPUT_TOKENS": "100", "MAX_TOTAL_TOKENS": "100"}, "MAX_INPUT_TOKENS"),
    ],
)
def test_malformed_values_name_the_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        load_settings(env)


def test_sagemaker_style_values():
    settings = load_settings(
        {
            "HF_MODEL_ID": "HuggingFaceH4/zephyr-7b-beta",
            "HF_MODEL_REVISION": "abc123",
            "SM_NUM_GPUS": "1",  # json.dumps(1), as the reference deploy snippet sends it
            "MESSAGES_API_ENABLED": "True",  # str(True), as our deploy scripts stringify it
            "HF_MODEL_TRUST_REMOTE_CODE": "1",
            "MAX_INPUT_TOKENS": "1024",
            "MAX_TOTAL_TOKENS": "2048",
            "MAX_CONCURRENT_REQUESTS": "16",
            "DTYPE": "BFloat16",
            "SAGEMAKER_BIND_TO_PORT": "9000",
        }
    )
    assert settings.model_id == "HuggingFaceH4/zephyr-7b-beta" and settings.model_revision == "abc123"
    assert settings.num_gpus == 1 and settings.messages_api_enabled and settings.trust_remote_code
    assert (settings.max_input_tokens, settings.max_total_tokens) == (1024, 2048)
    assert settings.max_concurrent_requests == 16 and settings.dtype == "bfloat16" and settings.port == 9000


def test_aliases_users_already_set():
    settings = load_settings({"HUGGING_FACE_HUB_TOKEN": "hf_x", "MAX_INPUT_LENGTH": "77"})
    assert settings.hf_token == "hf_x" and settings.max_input_tokens == 77
    assert load_settings({"HF_TOKEN": "a", "HUGGING_FACE_HUB_TOKEN": "b"}).hf_token == "a"


def test_empty_values_mean_unset():
    assert load_settings({"HF_MODEL_ID": "", "SM_NUM_GPUS": " "}) == Settings()


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_settings({}).port = 1


def test_placement_replicas_quantize_and_adapters():
    settings = load_settings(
        {
            "PLACEMENT": "Replicas",
            "REPLICAS": "2",
            "HF_MODEL_QUANTIZE": "bitsandbytes-nf4",
            "LORA_ADAPTERS": "sql=/a/sql, chat = /b/chat,",
        }
    )
    assert (settings.placement, settings.replicas, settings.quantize) == ("replicas", 2, "bitsandbytes-nf4")
    assert settings.lora_adapters == (("sql", "/a/sql"), ("chat", "/b/chat"))
    assert load_settings({}).placement == "auto" and load_settings({}).lora_adapters == ()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PLACEMENT": "spread"}, "PLACEMENT='spread' is not one of auto, shard, replicas"),
        ({"HF_MODEL_QUANTIZE": "int3"}, "HF_MODEL_QUANTIZE='int3' is not one of"),
        ({"REPLICAS": "0"}, "REPLICAS='0' must be greater than 0"),
        ({"PLACEMENT": "shard", "REPLICAS": "2"}, "REPLICAS=2 cannot be combined with PLACEMENT=shard"),
        ({"LORA_ADAPTERS": "sql"}, "LORA_ADAPTERS: 'sql' is not of the form adapter_name=path"),
        ({"LORA_ADAPTERS": "a=/x,a=/y"}, "adapter 'a' is listed twice"),
    ],
)
def test_placement_quantize_and_adapter_errors_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        load_settings(env)


def test_api_key_and_pickle_weights_settings():
    settings = load_settings({"API_KEY": " k-123456 ", "ALLOW_PICKLE_WEIGHTS": "true"})
    assert settings.api_key == "k-123456" and settings.allow_unsafe_weights is True
    assert load_settings({"HF_MODEL_ALLOW_UNSAFE_WEIGHTS": "1"}).allow_unsafe_weights is True  # the older name
    assert load_settings({}).allow_unsafe_weights is False and load_settings({}).api_key is None
    with pytest.raises(SettingsError, match="ALLOW_PICKLE_WEIGHTS"):
        load_settings({"ALLOW_PICKLE_WEIGHTS": "perhaps"})


def test_secrets_are_not_in_the_settings_repr():
    settings = load_settings({"API_KEY": "k-123456", "HF_TOKEN": "hf_abcdef123"})
    assert settings.hf_token == "hf_abcdef123"
    assert "k-123456" not in repr(settings) and "hf_abcdef123" not in repr(settings)


def test_sm_num_gpus_zero_means_the_cpu():
    assert load_settings({"SM_NUM_GPUS": "0"}).num_gpus == 0


def test_chat_template_is_an_existing_file_whatever_its_name_or_jinja_text(tmp_path):
    braces = tmp_path / "template{v2}.jinja"
    braces.write_text("{{ messages[0]['content'] }}")
    assert load_settings({"CHAT_TEMPLATE": str(braces)}).chat_template == "{{ messages[0]['content'] }}"
    assert load_settings(
        {"CHAT_TEMPLATE": "{% for m in messages %}{{ m.content }}{% endfor %}"}
    ).chat_template.startswith("{%")
    for value in (str(tmp_path / "missing{1}.jinja"), str(tmp_path / "missing.jinja")):
        with pytest.raises(SettingsError, match="CHAT_TEMPLATE=.*neither a Jinja template"):
            load_settings({"CHAT_TEMPLATE": value})


def test_torch_threads_come_from_torch_threads_or_omp_num_threads():
    assert load_settings({}).torch_threads is None
    assert load_settings({"OMP_NUM_THREADS": "3"}).torch_threads == 3
    assert load_settings({"TORCH_THREADS": "1", "OMP_NUM_THREADS": "3"}).torch_threads == 1
    with pytest.raises(SettingsError, match="TORCH_THREADS"):
        load_settings({"TORCH_THREADS": "0"})


def test_engine_process_is_on_unless_turned_off():
    assert load_settings({}).engine_process is True
    assert load_settings({"ENGINE_PROCESS": "false"}).engine_process is False
    with pytest.raises(SettingsError, match="ENGINE_PROCESS"):
        load_settings({"ENGINE_PROCESS": "sometimes"})
