import pytest

from serve.errors import ValidationFailed
from serve.sagemaker.invocations import CHAT, COMPLETION, GENERATE, payload_kind

MESSAGES = {"messages": [{"role": "user", "content": "hi"}]}


def test_messages_api_enabled_takes_messages():
    assert payload_kind(MESSAGES, messages_api_enabled=True) == CHAT


def test_messages_api_enabled_rejects_inputs_with_a_hint():
    with pytest.raises(ValidationFailed) as caught:
        payload_kind({"inputs": "hi"}, messages_api_enabled=True)
    assert '"messages"' in caught.value.message and "MESSAGES_API_ENABLED" in caught.value.message
    assert caught.value.status == 422


@pytest.mark.parametrize(
    "payload, kind",
    [
        ({"inputs": "hi"}, GENERATE),
        (MESSAGES, CHAT),
        ({"prompt": "hi"}, COMPLETION),
        ({"inputs": "x", "messages": []}, GENERATE),
    ],
)
def test_tgi_mode_dispatches_by_shape(payload, kind):
    assert payload_kind(payload, messages_api_enabled=False) == kind


def test_unknown_shape_names_what_to_send():
    with pytest.raises(ValidationFailed, match="inputs"):
        payload_kind({"text": "hi"}, messages_api_enabled=False)
