"""The engine through its own interface: submit() -> events, cancel(), admission, failures."""

import threading
import pytest
import torch

from serve.engine import Engine, EngineConfig, EngineNotReady, FinishReason, Request, SamplingParams
from serve.loading.loader import LoadedModel, load_model
from tests.helpers import TINY_KV_TOKENS, wait_for


def run(engine, prompt_ids, **params):
    events = list(engine.submit(Request(prompt_ids=prompt_ids, params=SamplingParams(**params))))
    return events, events[-1]


PROMPTS = [
    "The quick brown fox",
    "Hello",
    "Explain quantum computing in simple terms, please, with an example from everyday life.",
    "1 2 3 4 5",
    "def fibonacci(n):",
    "Les misérables est un roman de",
    "What is the capital of Australia?",
    "Once upon a time in a land far, far away, there lived a dragon who loved",
    "🤖 robots",
    "SELECT * FROM users WHERE",
    "a",
    "The mitochondria is the powerhouse of the cell because it produces energy in the form of ATP through respiration",
    "Translate to German: good morning",
    "List three colors:",
    "import numpy as np\nx = np.",
    "Why is the sky blue?",
]


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def token_ids(events):
    return [event.token_id for event in events if event.token_id is not None]


def test_greedy_matches_transformers_generate(tiny_engine, reference_model):
    prompt = tiny_engine.tokenizer("The quick brown fox", add_special_tokens=True)["input_ids"]
    events, final = run(tiny_engine, prompt, max_new_tokens=12, ignore_eos=True)
    with torch.inference_mode():
        reference = reference_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert token_ids(events) == reference
    assert final.finish_reason is FinishReason.LENGTH and final.generated_tokens == 12
    assert final.prompt_tokens == len(prompt) and final.timings is not None and final.timings.total > 0


def test_batched_greedy_equals_each_prompt_alone(tiny_settings):
    """16 different prompts generated together (continuous batching, chunked prefill) equal each one run alone.

    float32 on CPU; the prefill budget is small so long prompts are split into chunks that share steps with decode.
    """
    engine = Engine(
        load=lambda: load_model(tiny_settings),
        config=EngineConfig(max_batch_prefill_tokens=16, max_batch_total_tokens=TINY_KV_TOKENS),
    ).start()
    assert engine.wait_ready(60)
    try:
        prompts = [engine.tokenizer(text)["input_ids"] for text in PROMPTS]
        alone = [token_ids(run(engine, ids, max_new_tokens=24, ignore_eos=True)[0]) for ids in prompts]
        streams = [
            engine.submit(Request(prompt_ids=ids, params=SamplingParams(max_new_tokens=24, ignore_eos=True)))
            for ids in prompts
        ]
        together = [token_ids(list(stream)) for stream in streams]
    finally:
        engine.stop()
    assert together == alone


def test_text_deltas_join_to_the_decoded_output(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    events, _ = run(tiny_engine, tokenizer("Hello")["input_ids"], max_new_tokens=20, ignore_eos=True)
    ids = [event.token_id for event in events if event.token_id is not None]
    assert "".join(event.text for event in events) == tokenizer.decode(ids, skip_special_tokens=True)


def test_same_seed_same_output(tiny_engine):
    prompt = tiny_engine.tokenizer("Once upon a time")["input_ids"]
    params = dict(max_new_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    first = [e.token_id for e in run(tiny_engine, prompt, **params)[0]]
    second = [e.token_id for e in run(tiny_engine, prompt, **params)[0]]
    assert first == second


def test_stop_string_ends_generation_with_stop(tiny_engine):
    tokenizer = tiny_engine.tokenizer
    prompt = tokenizer("Hello")["input_ids"]
    free_text = "".join(e.text for e in run(tiny_engine, prompt, max_new_tokens=20, ignore_eos=True)[0])
    stop = free_text.strip()[3:6]
    assert len(stop) == 3, f"random model produced too little text: {free_text!r}"
    events, final = run(tiny_engine, prompt, max_new_tokens=20, ignore_eos=True, stop=(stop,))
    text = "".join(e.text for e in events)
    assert final.finish_reason is FinishReason.STOP and final.stop_sequence == stop
    assert stop not in text and free_text.startswith(text)


def test_cancel_stops_a_running_request(tiny_engine):
    stream = tiny_engine.submit(
        Request(prompt_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=400, ignore_eos=True))
    )
    events = stream.events()
    next(events)  # generation has started
    stream.close()
    final = [event for event in events if event is not None][-1]
    assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens < 400
    assert wait_for(lambda: tiny_engine.scheduler.in_flight == 0)


def test_concurrent_submits_all_complete(tiny_engine):
    results = {}

    def worker(index):
        events = list(
            tiny_engine.submit(
                Request(prompt_ids=[1, 2, index + 3], params=SamplingParams(max_new_tokens=5, ignore_eos=True))
            )
        )
        results[index] = events[-1]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    assert len(results) == 6 and all(r.finish_reason is FinishReason.LENGTH for r in results.values())


def test_the_core_queues_past_the_admission_cap_which_the_front_enforces(tiny_settings):
    engine = Engine(
        load=lambda: load_model(tiny_settings),
        config=EngineConfig(max_concurrent_requests=1, max_batch_total_tokens=TINY_KV_TOKENS),
    ).start()
    assert engine.wait_ready(60) and engine.limits.max_batch_size == 1
    try:
        first = engine.submit(Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=300, ignore_eos=True)))
        queued = engine.submit(Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=1, ignore_eos=True)))
        assert engine.in_flight == 2 and engine.served == 2
        first.close()
        assert list(queued)[-1].finish_reason is FinishReason.LENGTH
        assert wait_for(lambda: engine.scheduler.in_flight == 0 and engine.running == 0)
    finally:
        engine.stop()


def test_not_ready_before_load_and_load_failure_reported():
    release = threading.Event()

    def slow_failing_load():
        release.wait(10)
        raise RuntimeError("weights are corrupt")

    failures = []
    engine = Engine(load=slow_failing_load, on_load_failure=failures.append).start()
    with pytest.raises(EngineNotReady):
        engine.submit(Request(prompt_ids=[1], params=SamplingParams()))
    release.set()
    assert wait_for(lambda: failures)
    assert "corrupt" in str(engine.load_error) and not engine.ready


TRIGGER = 666


def exploding_llama(folder):
    """A test-only Llama whose forward fails whenever token 666 is among its inputs."""
    from transformers import LlamaForCausalLM

    class ExplodingLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, **kwargs):
            if input_ids is not None and bool((input_ids == TRIGGER).any()):
                raise RuntimeError("injected failure")
            return super().forward(input_ids=input_ids, **kwargs)

    return ExplodingLlama.from_pretrained(str(folder), dtype=torch.float32).eval()


def test_generation_failure_fails_only_that_request(tiny_settings):
    def load():
        loaded = load_model(tiny_settings)
        model = exploding_llama(tiny_settings.model_id)
        return LoadedModel(model, loaded.tokenizer, loaded.name, model.device, model.dtype, loaded.max_context)

    engine = Engine(load=load, config=EngineConfig(max_batch_total_tokens=TINY_KV_TOKENS)).start()
    assert engine.wait_ready(60)
    try:
        failed = list(engine.submit(Request(prompt_ids=[TRIGGER, 1, 2], params=SamplingParams(max_new_tokens=3))))[-1]
        assert failed.finish_reason is FinishReason.ERROR and "injected failure" in failed.error
        ok = list(
            engine.submit(Request(prompt_ids=[5, 1, 2], params=SamplingParams(max_new_tokens=3, ignore_eos=True)))
        )[-1]
        assert ok.finish_reason is FinishReason.LENGTH
    finally:
        engine.stop()


def test_cancelled_while_waiting_for_a_slot_is_dropped_at_once(tiny_settings):
    engine = Engine(
        load=lambda: load_model(tiny_settings),
        config=EngineConfig(max_batch_size=1, max_batch_total_tokens=TINY_KV_TOKENS),
    ).start()
    assert engine.wait_ready(60) and engine.limits.max_batch_size == 1
    try:
        running = engine.submit(Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=450, ignore_eos=True)))
        waiting = engine.submit(Request(prompt_ids=[3, 4], params=SamplingParams(max_new_tokens=5)))
        assert wait_for(lambda: engine.running == 1 and engine.scheduler.waiting == 1)
        waiting.close()
        final = list(waiting)[-1]
        assert final.finish_reason is FinishReason.CANCELLED and final.generated_tokens == 0
        assert engine.scheduler.in_flight == 1 and engine.running == 1  # the running request is untouched
        running.close()
        assert wait_for(lambda: engine.scheduler.in_flight == 0)
    finally:
        engine.stop()


def test_a_request_that_cannot_start_fails_alone(tiny_engine):
    # the HTTP edge bounds seeds; a seed torch refuses reaches the engine only through its own interface
    bad = list(tiny_engine.submit(Request(prompt_ids=[1, 2], params=SamplingParams(temperature=1.0, seed=2**70))))
    assert bad[-1].finish_reason is FinishReason.ERROR and bad[-1].error
    ok = list(tiny_engine.submit(Request(prompt_ids=[1, 2], params=SamplingParams(max_new_tokens=2, ignore_eos=True))))
    assert ok[-1].finish_reason is FinishReason.LENGTH and tiny_engine.running == 0
