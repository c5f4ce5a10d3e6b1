"""A tiny Llama whose weights make it answer each trigger token with a fixed text, token by token.

The embedded model's tokenizer gets one added token per trigger and per piece of every scripted answer (pieces
of a few characters, so markers such as ``<tool_call>`` or ``</think>`` are split across tokens). The model has one
layer whose attention and MLP write nothing (o_proj and down_proj are zero), so its logits depend on the last token
alone: the embedding of each trigger or piece is a one-hot vector, and the output row of the token that follows it
in its script has a large weight on that direction (the last piece is followed by end-of-text). Greedy or sampled
at temperature 1, the real engine then generates exactly the script, through the real tokenizer, detokenizer,
routes and parsers. ``[TOOL_CALLS]`` and ``<|python_tag|>`` are added as special tokens, as in their families'
vocabularies, so the detokenizer drops them and the front must put them back from their ids.
"""

from __future__ import annotations

from pathlib import Path

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
SCRIPTS = {
    "⟦think-call⟧": (
        "<think>\nThe user wants the weather and the time in Paris.\n</think>\n\nLet me check both.\n"
        f"<tool_call>\n{WEATHER}\n</tool_call>\n"
        '<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}\n</tool_call>'
    ),
    "⟦think-long⟧": "<think>\nFirst I weigh every option one by one, slowly, and then once more from the start",
    "⟦think-json⟧": '<think>\nA JSON object with the city.\n</think>\n\n{"city":"Paris"}',
    # Where a schema leaves one way on, llguidance allows only its own (longest-match) tokens of the forced text:
    # these pieces happen to be those; another wording may need another split.
    "⟦think-forced⟧": (
        '<think>\nI have to call the tool.\n</think>\n\n{"name":"get_weather","arguments":{"city":"Paris"}}'
    ),
    "⟦bad-call⟧": '<tool_call>\n{"name": "get_weather", "arguments": {"city": Paris}}\n</tool_call>',
    "⟦no-think⟧": "Paris is sunny today.",
    "⟦effort-low⟧": "Quick answer: Paris.",
    "⟦mistral⟧": '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}',
    "⟦llama3⟧": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "⟦pythonic⟧": '[get_weather(city="Paris"), get_time(timezone="Europe/Paris")]',
}
SPECIAL_PIECES = ("[TOOL_CALLS]", "<|python_tag|>")
PIECE_SIZES = (3, 4, 2, 5)
# The chat template: the messages' contents one after another, so the user's trigger is the prompt's last token;
# ``enable_thinking: false`` and ``reasoning_effort: "low"`` put other triggers last. Its comment names the markers
# a Qwen3 template shows (``auto`` picks the qwen3 and hermes parsers from them).
TEMPLATE = (
    "{#- <think> </think> enable_thinking <tool_call> -#}"
    "{%- for message in messages %}{{ message['content'] }}{% endfor -%}"
    "{%- if enable_thinking is defined and enable_thinking is false %}⟦no-think⟧{% endif -%}"
    "{%- if reasoning_effort is defined and reasoning_effort == 'low' %}⟦effort-low⟧{% endif -%}"
)


def split_pieces(text: str, taken: set[str]) -> list[str]:
    """``text`` cut into pieces of a few characters, each new to ``taken`` (one token has one successor)."""
    pieces: list[str] = []
    position, turn = 0, 0
    while position < len(text):
        special = next((s for s in SPECIAL_PIECES if text.startswith(s, position)), None)
        size = len(special) if special else PIECE_SIZES[turn % len(PIECE_SIZES)]
        while position + size < len(text) and text[position : position + size] in taken:
            size += 1
        piece = text[position : position + size]
        while piece in taken:  # only the tail can still repeat: join it to the pieces before
            taken.discard(pieces[-1])
            piece = pieces.pop() + piece
        pieces.append(piece)
        taken.add(piece)
        position, turn = position + size, turn + 1
    return pieces


def build_scripted_model(target: Path, tokenizer_source: Path) -> Path:
    """Write the scripted model and its tokenizer to ``target``."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    taken: set[str] = set(SCRIPTS)
    chains = {trigger: split_pieces(text, taken) for trigger, text in SCRIPTS.items()}
    plain = sorted(taken - set(SPECIAL_PIECES))
    tokenizer.add_tokens([AddedToken(piece, normalized=False, special=False) for piece in plain])
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_PIECES)})
    tokenizer.chat_template = TEMPLATE
    ids = {piece: tokenizer.convert_tokens_to_ids(piece) for piece in taken}
    successors = {}
    for trigger, pieces in chains.items():
        order = [trigger, *pieces]
        successors.update({ids[a]: ids[b] for a, b in zip(order, order[1:])})
        successors[ids[pieces[-1]]] = tokenizer.eos_token_id
    hidden = 64 * (len(successors) // 64 + 1)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    _script_weights(model, successors)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    return target


def _script_weights(model, successors: dict[int, int]) -> None:
    """Zero what attention and the MLP add; token -> one-hot direction -> its successor's output row."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                parameter.zero_()
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        for direction, (token, successor) in enumerate(successors.items()):
            embed[token, direction] = 1.0
            head[successor, direction] = 30.0
