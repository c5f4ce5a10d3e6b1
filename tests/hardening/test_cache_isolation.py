"""Tenant isolation in the prefix cache, through the HTTP routes over a real engine: a request reuses only blocks
cached under its own salt (``cache_salt``, OpenAI's ``prompt_cache_key``, TGI's ``parameters.cache_salt``), so its
``cached_tokens`` says nothing about what another salt sent; PREFIX_CACHE_SCOPE chooses what partitions the cache;
a malformed salt is a 4xx naming its field."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from serve.app import create_app
from serve.config import SettingsError, load_settings
from serve.front.cache_scope import cache_partition

SENTENCE = "The quick brown fox jumps over the lazy dog near the quiet river bank. "


def document() -> str:
    """A long prompt no other request sent: a fresh nonce first, so none of its blocks is cached yet."""
    return f"Reference {uuid.uuid4().hex}. " + SENTENCE * 10


def new_salt() -> str:
    return f"tenant-{uuid.uuid4().hex}"


@pytest.fixture
def scoped(tiny_settings, tiny_engine):
    """A Flask test client over the shared engine with PREFIX_CACHE_SCOPE set to ``scope``."""

    def client(scope: str, **settings):
        return create_app(replace(tiny_settings, prefix_cache_scope=scope, **settings), tiny_engine).test_client()

    return client


def chat_cached(client, text: str, path: str = "/v1/chat/completions", **extra) -> int:
    """The ``cached_tokens`` a chat completion of ``text`` reports (``text`` as the system prompt, so that its nonce
    falls in the first block: a default system prompt of the template would be shared by every request)."""
    messages = [{"role": "system", "content": text}, {"role": "user", "content": "Summarise."}]
    body = {"model": "tgi", "messages": messages, "max_tokens": 1, "temperature": 0}
    response = client.post(path, json={**body, **extra})
    assert response.status_code == 200, response.get_data(as_text=True)
    usage = response.json["usage"]
    assert usage["prompt_tokens"] > 100  # long enough to span several blocks
    return usage["prompt_tokens_details"]["cached_tokens"]


def completion_cached(client, text: str, **extra) -> int:
    body = {"model": "tgi", "prompt": text, "max_tokens": 1, "temperature": 0}
    response = client.post("/v1/completions", json={**body, **extra})
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.json["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_different_salt_finds_nothing_cached_and_the_same_salt_finds_the_prefix(client):
    text, first, second = document(), new_salt(), new_salt()
    assert chat_cached(client, text, cache_salt=first) == 0
    assert chat_cached(client, text, cache_salt=second) == 0  # the same prompt, cached under another salt
    assert chat_cached(client, text, cache_salt=first) >= 96  # its own salt: the whole prompt but its last block
    assert chat_cached(client, text) == 0  # no salt: the shared partition, which never saw this prompt


def test_unsalted_requests_still_share_the_cache_by_default(client):
    text = document()
    chat_cached(client, text)
    assert chat_cached(client, text) >= 96


def test_prompt_cache_key_is_the_salt_of_openai_clients(client):
    text, key = document(), new_salt()
    assert completion_cached(client, text, prompt_cache_key=key) == 0
    assert completion_cached(client, text, prompt_cache_key=new_salt()) == 0
    assert completion_cached(client, text, cache_salt=new_salt(), prompt_cache_key=key) == 0  # cache_salt wins
    assert completion_cached(client, text, prompt_cache_key=key) >= 96


def test_invocations_chat_payloads_carry_the_salt(messages_client):
    text, salt = document(), new_salt()
    assert chat_cached(messages_client, text, "/invocations", cache_salt=salt) == 0
    assert chat_cached(messages_client, text, "/invocations", cache_salt=new_salt()) == 0
    assert chat_cached(messages_client, text, "/invocations", cache_salt=salt) > 0


def test_tgi_requests_reuse_only_their_own_salt(client, tiny_engine):
    """TGI bodies report no cached tokens: the engine's prefix-hit counter shows what each request reused."""
    text, salt = document(), new_salt()

    def hits(cache_salt: str) -> int:
        before = tiny_engine.stats().prefix_hit_tokens
        body = {"inputs": text, "parameters": {"max_new_tokens": 1, "cache_salt": cache_salt}}
        response = client.post("/generate", json=body)
        assert response.status_code == 200, response.get_data(as_text=True)
        return tiny_engine.stats().prefix_hit_tokens - before

    assert hits(salt) == 0
    assert hits(new_salt()) == 0
    assert hits(salt) >= 96


def test_the_global_scope_ignores_salts(scoped):
    client, text = scoped("global"), document()
    assert chat_cached(client, text, cache_salt=new_salt()) == 0
    assert chat_cached(client, text, cache_salt=new_salt()) >= 96


def test_the_adapter_scope_shares_no_unsalted_base_model_request(scoped):
    client, text, salt = scoped("adapter"), document(), new_salt()
    assert chat_cached(client, text) == 0
    assert chat_cached(client, text) == 0  # the base model is no one's tenant: nothing shared without a salt
    assert chat_cached(client, text, cache_salt=salt) == 0
    assert chat_cached(client, text, cache_salt=salt) >= 96  # a salt groups requests again


def test_the_adapter_scope_keeps_a_sessions_own_prefix(scoped, tiny_engine):
    """An unsalted base-model session shares nothing with others, but its next turn reuses its own conversation."""
    client = scoped("adapter", stateful_sessions=True)
    created = client.post("/invocations", json={"requestType": "NEW_SESSION"})
    session = {"X-Amzn-SageMaker-Session-Id": created.headers["X-Amzn-SageMaker-New-Session-Id"].split(";")[0]}
    body = {"inputs": document(), "parameters": {"max_new_tokens": 1}}

    def hits(headers: dict) -> int:
        before = tiny_engine.stats().prefix_hit_tokens
        response = client.post("/invocations", json=body, headers=headers)
        assert response.status_code == 200, response.get_data(as_text=True)
        return tiny_engine.stats().prefix_hit_tokens - before

    try:
        assert hits(session) == 0
        assert hits({}) == 0  # another client, no session: not the session's partition
        assert hits(session) >= 96
    finally:
        client.post("/invocations", json={"requestType": "CLOSE"}, headers=session)


@pytest.mark.parametrize(
    "field, value",
    [
        ("cache_salt", 7),
        ("cache_salt", ""),
        ("cache_salt", "x" * 257),
        ("cache_salt", ["a"]),
        ("prompt_cache_key", {"tenant": "a"}),
        ("prompt_cache_key", "k" * 1000),
    ],
)
def test_a_malformed_salt_is_a_4xx_naming_the_field(client, field, value):
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ):
        response = client.post(path, json={**body, field: value})
        assert response.status_code == 400, response.get_data(as_text=True)
        assert field in response.json["error"]["message"]
    assert client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("value", [7, "", "x" * 257])
def test_a_malformed_tgi_salt_is_a_422_naming_the_field(client, value):
    response = client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 1, "cache_salt": value}})
    assert response.status_code == 422, response.get_data(as_text=True)
    assert "parameters.cache_salt" in response.json["error"]


def test_the_scope_setting_is_read_and_checked():
    assert load_settings({}).prefix_cache_scope == "salt"
    assert load_settings({"PREFIX_CACHE_SCOPE": " Adapter "}).prefix_cache_scope == "adapter"
    with pytest.raises(SettingsError, match="PREFIX_CACHE_SCOPE"):
        load_settings({"PREFIX_CACHE_SCOPE": "tenant"})


def test_partitions_per_scope():
    assert cache_partition("global", "a", None, None) is None
    assert cache_partition("salt", "a", None, None) == cache_partition("adapter", "a", "lora", None) == "salt:a"
    assert cache_partition("salt", None, None, "s1") is None  # unsalted: the shared partition
    assert cache_partition("adapter", None, "lora", None) is None  # an adapter's own unsalted partition
    assert cache_partition("adapter", None, None, "s1") == "session:s1"
    private = {cache_partition("adapter", None, None, None) for _ in range(3)}
    assert len(private) == 3 and None not in private
    assert cache_partition("salt", "session:s1", None, None) != "session:s1"  # a salt never names a session's part
