"""The EMF writer: its lines are valid EMF documents and each interval's values are that interval's."""

import json
from types import SimpleNamespace

import pytest

from serve.sagemaker.emf import EmfReporter, percentile
from serve.engine.types import EngineStats, Limits
from serve.engine.types import FinishReason, Timings, TokenEvent
from serve.metrics import Metrics
from tests.emf_schema import validate_emf


class Clock:
    now = 1_700_000_000.0

    def __call__(self):
        return self.now


def engine(waiting=0, running=0):
    """An engine stand-in: ``running`` sequences holding 2 of the pool's 8 KV blocks each."""
    return SimpleNamespace(
        ready=True,
        running=running,
        waiting=waiting,
        in_flight=waiting + running,
        scheduler=SimpleNamespace(waiting=waiting, in_flight=waiting + running),
        limits=Limits(100, 200, 800, 4),
        stats=lambda: EngineStats(blocks_used=2 * running, blocks_total=8),
    )


def finished(tokens: int, ttft: float) -> TokenEvent:
    return TokenEvent(None, "", FinishReason.STOP, tokens, 5, Timings(queue=ttft / 2, prefill=ttft / 2, decode=0.1))


def test_a_line_is_a_valid_emf_document_with_this_intervals_values():
    clock, lines = Clock(), []
    live = engine(waiting=3, running=2)
    metrics = Metrics(live)
    reporter = EmfReporter(
        live, metrics, "llm", {"EndpointName": "ep", "VariantName": "AllTraffic"}, 60, lines.append, clock
    )
    for ttft in (0.1, 0.2, 0.3, 0.4, 1.0):
        metrics.observe(finished(20, ttft))
    for _ in range(2):
        metrics.requests.labels("/invocations", "429").inc()
    metrics.requests.labels("/invocations", "200").inc()
    clock.now += 10
    document = json.loads(reporter.line())
    validate_emf(document)
    assert document["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["EndpointName", "VariantName"]]
    assert document["_aws"]["Timestamp"] == int(clock.now * 1000)
    assert (document["EndpointName"], document["VariantName"]) == ("ep", "AllTraffic")
    assert document["QueueLength"] == 3 and document["RunningSequences"] == 2 and document["KVCacheUsage"] == 50.0
    assert document["OutputTokensPerSecond"] == 10.0  # 100 tokens in 10 s
    assert document["TimeToFirstTokenP50"] == 300.0 and document["TimeToFirstTokenP90"] == 1000.0
    assert document["Throttled429"] == 2
    clock.now += 10
    quiet = json.loads(reporter.line())  # nothing happened since: the next interval starts from zero
    assert quiet["OutputTokensPerSecond"] == 0 and quiet["Throttled429"] == 0 and quiet["TimeToFirstTokenP50"] == 0


def test_without_endpoint_names_the_service_is_the_dimension():
    reporter = EmfReporter(engine(), Metrics(engine()), "llm", {}, 60, print, Clock())
    document = json.loads(reporter.line())
    validate_emf(document)
    assert document["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["Service"]] and document["Service"] == "llm"


def test_the_schema_check_catches_broken_documents():
    good = json.loads(EmfReporter(engine(), Metrics(engine()), "llm", {}, 60, print, Clock()).line())
    for broken in (
        {**good, "_aws": {**good["_aws"], "Timestamp": "now"}},
        {key: value for key, value in good.items() if key != "QueueLength"},
        {key: value for key, value in good.items() if key != "Service"},
        {
            **good,
            "_aws": {
                **good["_aws"],
                "CloudWatchMetrics": [
                    {**good["_aws"]["CloudWatchMetrics"][0], "Metrics": [{"Name": "QueueLength", "Unit": "Things"}]}
                ],
            },
        },
    ):
        with pytest.raises(Exception):
            validate_emf(broken)


def test_percentile_nearest_rank():
    assert percentile([], 0.5) == 0 and percentile([3.0], 0.9) == 3.0
    assert percentile([1, 2, 3, 4], 0.5) == 2 and percentile(list(range(1, 11)), 0.9) == 9
