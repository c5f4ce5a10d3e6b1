"""SPECULATIVE=eagle3:<path> with random EAGLE-3 heads written here in the published checkpoint format, loaded
through the real loader beside the tiny target: greedy tokens and text are the same as without speculation (in a
batch, with long prompts, through preemption); every proposal the engine makes is the head's own guess, computed
here by a dense reference from the target's hidden states; heads that do not fit the target are refused at load."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from serve.engine import Request, SamplingParams
from serve.engine.eagle3 import CATCH_UP_AT
from tests.unit.test_speculative_draft import read, results_and_stats, start

PROMPTS = [
    "one two three one two three one two",
    "def add(a, b):\n    return a + b\n\ndef add(a, b):",
    "The cat sat on the mat. The cat sat",
    "hello",
    " ".join(f"word{index}" for index in range(40)),  # past the head's unasked catch-up (64 positions)
]
NEW_TOKENS = [100, 12, 90, 6, 80]  # ends at different steps: the last two propose after 80 steps that did not
AUX = [0, 1, 1]  # the tiny target has two layers: the head names the ones it reads
DRAFT_VOCAB = 512


def write_head(folder, target_config, seed=3, pickled=False, **overrides):
    """A random EAGLE-3 head for ``target_config`` as the published heads are saved (``overrides``: config keys)."""
    hidden, vocab = target_config.hidden_size, target_config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    random = lambda *shape: torch.randn(*shape, generator=generator) * 0.2  # noqa: E731
    heads, kv_heads = target_config.num_attention_heads, target_config.num_key_value_heads
    head_dim = hidden // heads
    chosen = torch.randperm(vocab, generator=generator)[:DRAFT_VOCAB].sort().values
    tensors = {
        "fc.weight": random(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": random(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": random(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": random(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": random(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": random(2 * hidden, hidden),
        "midlayer.mlp.up_proj.weight": random(2 * hidden, hidden),
        "midlayer.mlp.down_proj.weight": random(hidden, 2 * hidden),
        "lm_head.weight": random(DRAFT_VOCAB, hidden),
        "d2t": chosen - torch.arange(DRAFT_VOCAB),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, chosen, True),
    }
    for norm in ("midlayer.input_layernorm", "midlayer.hidden_norm", "midlayer.post_attention_layernorm", "norm"):
        tensors[f"{norm}.weight"] = 1.0 + random(hidden)
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "num_hidden_layers": 1,
        "vocab_size": vocab,
        "draft_vocab_size": DRAFT_VOCAB,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": AUX},
        **overrides,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if pickled:
        torch.save(tensors, folder / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(folder / "model.safetensors"))
    return folder


@pytest.fixture(scope="module")
def target(tiny_model_dir):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, target):
    return write_head(tmp_path_factory.mktemp("eagle3-head"), target.config)


@pytest.fixture(scope="module")
def prompt_ids(tiny_engine):
    return [tiny_engine.tokenizer(text)["input_ids"] for text in PROMPTS]


def run_all(engine, prompts):
    """Each prompt's greedy (token, text) pairs, all submitted at once (the i-th of a prompt gets NEW_TOKENS[i])."""
    streams = [
        engine.submit(Request(prompt_ids=prompt, params=SamplingParams(max_new_tokens=count, ignore_eos=True)))
        for prompt, count in zip(prompts, NEW_TOKENS * 2)
    ]
    return [[(e.token_id, e.text) for e in read(stream) if e.token_id is not None] for stream in streams]


@pytest.fixture(scope="module")
def plain(tiny_engine, prompt_ids):
    return run_all(tiny_engine, prompt_ids)


def with_head(settings, folder, **changes):
    return replace(settings, speculative="eagle3", speculative_draft=str(folder), speculative_tokens=4, **changes)


def recording(engine):
    """Wrap the proposer: every (sequence's tokens, proposal) it makes, as made."""
    proposer, made = engine.scheduler.speculator.proposer, []
    original = proposer.propose_rows

    def propose_rows(rows, reserve):
        proposals = original(rows, reserve)
        made.extend((list(seq.all_ids[: seq.num_cached + 1]), p) for (seq, _), p in zip(rows, proposals) if p)
        return proposals

    proposer.propose_rows = propose_rows
    return made


def saved_peak(proposer):
    """Wrap ``record``: the most positions any sequence had saved after it, as a one-item list."""
    peak, original = [0], proposer.record

    def record(spans):
        original(spans)
        peak[0] = max([peak[0]] + [len(states) for states in proposer._saved.values()])

    proposer.record = record
    return peak


@pytest.fixture(scope="module")
def eagle_run(tiny_settings, head_dir, prompt_ids):
    """The prompts with proposals only while at most two sequences run: the others save states for 80 steps."""
    engine = start(with_head(tiny_settings, head_dir))
    engine.scheduler.speculator.max_batch = 2
    proposer = engine.scheduler.speculator.proposer
    peak = saved_peak(proposer)
    engine._runner.hidden_observer = proposer.record  # the wrapped one
    try:
        made = recording(engine)
        results = run_all(engine, prompt_ids)
        pages = served_pages(engine, with_head(tiny_settings, head_dir))
        return results, made, engine.stats(), proposer, peak[0], pages
    finally:
        engine.stop()


def served_pages(engine, settings):
    """/info's ``speculative`` and the /metrics text, as the app serves them over this engine."""
    from serve.app import create_app

    client = create_app(settings, engine).test_client()
    return client.get("/info").get_json()["speculative"], client.get("/metrics").get_data(as_text=True)


def test_greedy_output_is_the_same_with_an_eagle3_head(eagle_run, plain):
    results, made, stats, proposer, peak, _ = eagle_run
    assert results == plain
    assert peak <= CATCH_UP_AT + 2  # states saved while not proposing were caught up on, not kept
    assert stats.speculative_proposer == "eagle3" and stats.speculative_proposed > 0 and made
    assert stats.blocks_used == 0  # the tails of rejected tokens came back
    assert proposer.cache.shape.layers == 1 and proposer._cached == {} and proposer._saved == {}  # all forgotten


def test_every_proposal_is_the_heads_own_guess(eagle_run, target, head_dir):
    """A dense reference of the published architecture, fed the target's hidden states from transformers' own
    forward, guesses the same tokens the engine proposed, after long prompts and unasked catch-ups too."""
    made = eagle_run[1]
    weights, d2t = reference_weights(head_dir)
    checked = {len(tokens) for tokens, _ in made}
    assert any(length > 64 for length in checked)  # a proposal after the head caught up unasked
    for tokens, proposal in made:
        assert reference_guesses(target, weights, d2t, tokens, len(proposal)) == proposal, tokens[-5:]


def test_info_and_metrics_name_the_head(eagle_run, head_dir):
    stats, (described, metrics) = eagle_run[2], eagle_run[5]
    assert described == f"eagle3 ({head_dir}): 4 tokens proposed per step, the EAGLE-3 head's greedy tokens"
    proposed = float(stats.speculative_proposed)
    assert f'serve_speculative_proposed_tokens_total{{proposer="eagle3"}} {proposed}' in metrics


def test_preemption_loses_nothing(tiny_settings, head_dir, prompt_ids, plain):
    longest = max(len(prompt) + count for prompt, count in zip(prompt_ids, NEW_TOKENS))
    small = with_head(tiny_settings, head_dir, max_total_tokens=longest, kv_block_size=4)
    results, stats = results_and_stats(replace(small, max_batch_total_tokens=2 * longest), prompt_ids * 2, run_all)
    assert results == plain * 2
    assert stats.preemptions > 0 and stats.speculative_proposed > 0


# --- a dense reference of the head ---------------------------------------------------------------------------------


def reference_weights(folder):
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    return weights, weights["d2t"]


def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight


def rope(x, positions):
    dim = x.shape[-1]
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2).float() / dim))
    angles = positions[:, None].float() * inv[None]
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]
    rotated = torch.cat((-x[..., dim // 2 :], x[..., : dim // 2]), -1)
    return x * cos + rotated * sin


def head_layer(w, embeds, states):
    """The head's output states for a whole sequence of (embedding, state) rows, causal over all of them."""
    n, hidden = embeds.shape
    normed = rms(states, w["midlayer.hidden_norm.weight"])
    joined = torch.cat((rms(embeds, w["midlayer.input_layernorm.weight"]), normed), -1)
    q = (joined @ w["midlayer.self_attn.q_proj.weight"].T).view(n, 4, -1)
    k = (joined @ w["midlayer.self_attn.k_proj.weight"].T).view(n, 2, -1).repeat_interleave(2, dim=1)
    v = (joined @ w["midlayer.self_attn.v_proj.weight"].T).view(n, 2, -1).repeat_interleave(2, dim=1)
    positions = torch.arange(n)
    q, k = rope(q, positions), rope(k, positions)
    attended = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
    residual = states + attended.transpose(0, 1).reshape(n, hidden) @ w["midlayer.self_attn.o_proj.weight"].T
    x = rms(residual, w["midlayer.post_attention_layernorm.weight"])
    mlp = (F.silu(x @ w["midlayer.mlp.gate_proj.weight"].T) * (x @ w["midlayer.mlp.up_proj.weight"].T)) @ w[
        "midlayer.mlp.down_proj.weight"
    ].T
    return residual + mlp


@torch.no_grad()
def reference_guesses(target, w, d2t, tokens, count):
    """The head's ``count`` greedy guesses after ``tokens`` (whose last one the target has not run yet)."""
    out = target(input_ids=torch.tensor([tokens[:-1]]), output_hidden_states=True)
    folded = torch.cat([out.hidden_states[index][0] for index in AUX], -1) @ w["fc.weight"].T
    embed = target.get_input_embeddings().weight
    ids, states, guesses = list(tokens[1:]), folded, []
    for _ in range(count):
        outputs = head_layer(w, embed[torch.tensor(ids)], states)
        draft = int((rms(outputs[-1], w["norm.weight"]) @ w["lm_head.weight"].T).argmax())
        guesses.append(draft + int(d2t[draft]))
        ids.append(guesses[-1])
        states = torch.cat((states, outputs[-1:]))
    return guesses


# --- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"architectures": ["LlamaForCausalLM"]}, "is not an EAGLE-3 head: its architectures are ['LlamaForCausalLM']"),
        ({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 5]}}, "reads layers [0, 1, 5]; the target has 2"),
        ({"target_hidden_size": 32}, "reads states of size 32; the target's are 64"),
    ],
)
def test_a_head_that_does_not_fit_the_target_is_refused_at_load(tiny_settings, target, tmp_path, overrides, words):
    folder = write_head(tmp_path / "head", target.config, **overrides)
    assert_refused(with_head(tiny_settings, folder), folder, words)


def test_a_head_mapping_ids_outside_the_vocabulary_is_refused(tiny_settings, target, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_head(tmp_path / "head", target.config)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["d2t"][-1] += target.config.vocab_size
    save_file(tensors, str(folder / "model.safetensors"))
    assert_refused(with_head(tiny_settings, folder), folder, "outside the target's vocabulary")


def test_pickle_weights_load_only_where_allowed(tiny_settings, target, tmp_path):
    from serve.loading.loader import load_model

    folder = write_head(tmp_path / "head", target.config, pickled=True)
    assert_refused(with_head(tiny_settings, folder), folder, "refused unless ALLOW_PICKLE_WEIGHTS=true")
    head = load_model(with_head(tiny_settings, folder, allow_unsafe_weights=True)).draft
    saved = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert torch.equal(head.d2t, saved["d2t"]) and torch.equal(head.fc.weight, saved["fc.weight"])
    assert head.aux_layers == tuple(AUX) and head.embed_tokens is None  # the target's embedding serves


def assert_refused(settings, folder, words):
    from serve.loading.loader import load_model
    from serve.loading.source import ModelLoadError

    with pytest.raises(ModelLoadError) as raised:
        load_model(settings)
    assert f"SPECULATIVE=eagle3:{folder}" in str(raised.value) and words in str(raised.value), str(raised.value)


def test_without_layer_ids_the_head_reads_the_low_middle_and_high_layers():
    from types import SimpleNamespace

    from serve.modeling.eagle3 import aux_layers_of

    assert aux_layers_of(SimpleNamespace(), 32) == (2, 16, 29)
    assert aux_layers_of(SimpleNamespace(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 5, 9]}), 32) == (1, 5, 9)


@torch.no_grad()
def test_a_transformers_target_gives_its_layer_inputs_through_hooks(tiny_model_dir, tiny_engine):
    from transformers import LlamaForCausalLM

    from serve.engine.eagle3 import HiddenCapture

    target = LlamaForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    capture = HiddenCapture(target, (1, 0, 1))
    ids = torch.tensor([tiny_engine.tokenizer("a few tokens here")["input_ids"]])
    expected = target(input_ids=ids, output_hidden_states=True).hidden_states
    states = capture.take()
    assert [state.shape for state in states] == [(ids.shape[1], target.config.hidden_size)] * 3
    for state, index in zip(states, (1, 0, 1)):
        assert torch.equal(state, expected[index][0])
    assert capture.take() is None  # taken: the next forward's come next


@pytest.mark.slow
def test_embedded_smollm2_greedy_is_byte_identical_with_an_eagle3_head(embedded_folder, tmp_path):
    """The real embedded model (float32), 20 prompts, 4 running at a time, a random head of its shape: the same tokens
    and text as with speculation off."""
    from transformers import AutoConfig

    from tests.unit.test_lean_model import settings_for
    from tests.unit.test_speculative_engine import embedded_runs

    head = write_head(tmp_path / "head", AutoConfig.from_pretrained(str(embedded_folder)), eagle_config={})
    settings = settings_for(embedded_folder, max_concurrent_requests=4)
    off, _ = embedded_runs(settings)
    on, stats = embedded_runs(replace(settings, speculative="eagle3", speculative_draft=str(head)))
    assert on == off
    assert stats.speculative_proposed > 0
