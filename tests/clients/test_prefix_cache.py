"""The prefix cache as clients see it, through real gunicorn and the openai client: cached_tokens in usage
(chat and completions, streamed usage too), the request log, /metrics and /info."""

import uuid

import requests

from tests.helpers import wait_for

SYSTEM = "You are a careful assistant who answers every question in one short sentence. " * 4


def chat(openai_client, question, **extra):
    return openai_client.chat.completions.create(
        model="tgi",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        max_tokens=3,
        temperature=0,
        **extra,
    )


def metric(server, name):
    text = requests.get(server.url + "/metrics", timeout=10).text
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_a_repeated_system_prompt_is_reported_as_cached_tokens(openai_client, tiny_server):
    hits_before = metric(tiny_server, "serve_prefix_cache_hits_total")
    first = chat(openai_client, "What is the tallest mountain?")
    second = chat(openai_client, "Name a river.")
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # the shared system prompt, in whole blocks
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens_details.cached_tokens
    assert (
        metric(tiny_server, "serve_prefix_cache_hits_total") - hits_before
        >= second.usage.prompt_tokens_details.cached_tokens
    )
    stream = chat(openai_client, "Name a lake.", stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert len(usage) == 1 and usage[0].prompt_tokens_details.cached_tokens >= 16
    assert "cached_tokens=" in tiny_server.log()


def test_completions_report_cached_tokens(openai_client):
    prompt = SYSTEM + "Question: why is the sky blue? Answer:"
    openai_client.completions.create(model="tgi", prompt=prompt, max_tokens=2, temperature=0)
    again = openai_client.completions.create(model="tgi", prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_the_cache_is_shared_only_within_a_salt(openai_client):
    """vLLM's cache_salt (sent as an extra body field) and OpenAI's own prompt_cache_key partition the cache: a
    client learns nothing from cached_tokens about a prompt another salt sent."""
    document = f"Reference {uuid.uuid4().hex}. " + SYSTEM

    def cached(**extra):
        return chat(openai_client, document, **extra).usage.prompt_tokens_details.cached_tokens

    mine, theirs = {"cache_salt": uuid.uuid4().hex}, {"cache_salt": uuid.uuid4().hex}
    assert cached(extra_body=mine) == 0
    assert cached(extra_body=theirs) == 0  # the same prompt, cached under another salt
    assert cached(extra_body=mine) >= 64
    key = uuid.uuid4().hex
    assert cached(prompt_cache_key=key) == 0
    assert cached(prompt_cache_key=key) >= 64


def test_metrics_and_info_show_the_kv_pool(tiny_server):
    total = metric(tiny_server, "serve_kv_blocks_total")
    assert total > 0 and 0 <= metric(tiny_server, "serve_kv_blocks_used") <= total
    assert metric(tiny_server, "serve_prefix_cache_queries_total") >= metric(
        tiny_server, "serve_prefix_cache_hits_total"
    )
    assert metric(tiny_server, "serve_preemptions_total") >= 0 and metric(tiny_server, "serve_batch_peak_size") >= 1
    info = requests.get(tiny_server.url + "/info", timeout=10).json()
    assert info["kv_block_size"] == 16 and info["kv_blocks"] == total
    assert info["max_batch_total_tokens"] == info["kv_blocks"] * info["kv_block_size"]


def test_metrics_count_the_steps_by_path_in_every_worker(openai_client, tiny_server):
    """Through gunicorn's multiprocess metrics: every path's series, at zero until it counts (no graphs on the CPU)."""
    chat(openai_client, "Count to three.")

    def paths():
        text = requests.get(tiny_server.url + "/metrics", timeout=10).text
        prefix = 'serve_engine_steps_by_path_total{path="'
        return {
            line[len(prefix) :].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }

    assert wait_for(lambda: paths().get("fixed_shape", 0) > 0, timeout=5)  # the workers refresh every 0.25 s
    counted = paths()
    assert set(counted) == {"graph", "fixed_shape", "eager", "piecewise"} and counted["eager"] > 0
    assert counted["graph"] == counted["piecewise"] == 0
