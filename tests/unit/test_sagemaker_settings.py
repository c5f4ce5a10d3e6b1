"""Settings of the SageMaker-native features: defaults on and off SageMaker, and malformed values."""

import pytest

from serve.config import SettingsError, load_settings, on_sagemaker


def test_off_sagemaker_there_is_no_deadline_and_no_emf():
    if on_sagemaker({}):
        pytest.skip("this machine has /opt/ml")
    settings = load_settings({"SAGEMAKER_REGION": ""})  # empty: not a sign of SageMaker
    assert settings.invocation_timeout is None and settings.cloudwatch_metrics is False
    assert load_settings({"INVOCATION_TIMEOUT": "45"}).invocation_timeout == 45  # a deadline off SageMaker if asked


def test_on_sagemaker_the_deadline_is_60_s_and_emf_is_on():
    settings = load_settings({"SAGEMAKER_ENDPOINT_NAME": "chat", "SAGEMAKER_VARIANT_NAME": "AllTraffic"})
    assert (
        settings.invocation_timeout == 60 and settings.cloudwatch_metrics is True and settings.cloudwatch_interval == 60
    )
    assert (settings.endpoint_name, settings.variant_name) == ("chat", "AllTraffic")
    off = load_settings({"SAGEMAKER_ENDPOINT_NAME": "chat", "INVOCATION_TIMEOUT": "0", "CLOUDWATCH_METRICS": "false"})
    assert off.invocation_timeout is None and off.cloudwatch_metrics is False
    assert on_sagemaker({}, opt_ml="/") is True  # the /opt/ml folder alone says so


def test_explicit_values_and_errors():
    settings = load_settings(
        {
            "INVOCATION_TIMEOUT": "30",
            "INVOCATION_TIMEOUT_MARGIN": "5",
            "MAX_LORA_RANK": "16",
            "SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "True",
            "SAGEMAKER_SESSIONS_EXPIRATION": "60",
            "CLOUDWATCH_METRICS": "1",
            "CLOUDWATCH_METRICS_INTERVAL": "10",
        }
    )
    assert (settings.invocation_timeout, settings.invocation_timeout_margin, settings.max_lora_rank) == (30, 5, 16)
    assert settings.stateful_sessions and settings.sessions_expiration == 60 and settings.cloudwatch_interval == 10
    for env, message in (
        ({"INVOCATION_TIMEOUT": "soon"}, "INVOCATION_TIMEOUT='soon' is not a number of seconds"),
        ({"INVOCATION_TIMEOUT": "2"}, "INVOCATION_TIMEOUT=2 must be greater than INVOCATION_TIMEOUT_MARGIN=3"),
        ({"SAGEMAKER_SESSIONS_EXPIRATION": "-1"}, "SAGEMAKER_SESSIONS_EXPIRATION='-1' must be greater than 0"),
        ({"MAX_LORA_RANK": "x"}, "MAX_LORA_RANK='x' is not an integer"),
        (
            {"SAGEMAKER_ENABLE_STATEFUL_SESSIONS": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"},
            "SAGEMAKER_ENABLE_STATEFUL_SESSIONS=true needs SAGEMAKER_MODEL_SERVER_WORKERS=1, not 2",
        ),
    ):
        with pytest.raises(SettingsError, match=message):
            load_settings(env)
