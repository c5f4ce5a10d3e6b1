"""Engine contracts behind /v1/completions scoring and logit_bias, through submit(): what a rewritten runner must
keep."""

import torch

from serve.engine import FinishReason, Request, SamplingParams


def events_of(engine, prompt_ids, **params):
    return list(engine.submit(Request(prompt_ids=prompt_ids, params=SamplingParams(**params))))


def test_max_new_tokens_zero_scores_the_prompt_and_finishes_without_a_token(tiny_engine, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompt = tiny_engine.tokenizer("The capital of France is")["input_ids"]
    events = events_of(tiny_engine, prompt, max_new_tokens=0, prompt_logprobs=True, logprobs=3)
    assert len(events) == 1
    final = events[0]
    assert final.token_id is None and final.text == "" and final.finish_reason is FinishReason.LENGTH
    assert final.generated_tokens == 0 and final.prompt_tokens == len(prompt)
    assert final.prompt_logprobs[0] is None and len(final.prompt_logprobs) == len(prompt)
    assert final.prompt_top_logprobs[0] == () and all(len(top) == 3 for top in final.prompt_top_logprobs[1:])
    for value, top in zip(final.prompt_logprobs[1:], final.prompt_top_logprobs[1:]):
        assert top[0][1] >= value and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=tiny_engine.loaded.dtype)
    with torch.inference_mode():  # the same numbers as transformers' own forward pass
        logits = reference(torch.tensor([prompt])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert torch.allclose(torch.tensor(final.prompt_logprobs[1:]), expected, atol=1e-4)
    generated = events_of(tiny_engine, prompt, max_new_tokens=2, prompt_logprobs=True, logprobs=3, ignore_eos=True)
    assert generated[0].prompt_logprobs == final.prompt_logprobs and len(generated) == 2


def test_logit_bias_forces_a_token_per_request(tiny_engine):
    prompt = tiny_engine.tokenizer("Hello")["input_ids"]
    forced = [
        events_of(tiny_engine, prompt, max_new_tokens=3, ignore_eos=True, logit_bias=((token, 100.0),))
        for token in (42, 4242)
    ]
    assert [[event.token_id for event in events] for events in forced] == [[42] * 3, [4242] * 3]
