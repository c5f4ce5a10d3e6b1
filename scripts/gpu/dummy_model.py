"""Write a dummy-weights model folder: config.json of a named shape + the embedded SmolLM2 tokenizer and template.

    python scripts/gpu/dummy_model.py OUT_DIR --shape llama-3.1-8b|smollm2-135m|tiny [--source DIR]
    python scripts/gpu/dummy_model.py --export-tokenizer DIR   # the embedded tokenizer + config, no weights

The tokenizer comes from the embedded GGUF (converted once by the loader), or from ``--source``: a folder written
by ``--export-tokenizer`` (how it travels to a GPU machine that lacks the 100 MB GGUF).

The folder holds no weights: serve it with HF_MODEL_LOAD_FORMAT=dummy (random weights built on the device).
When the shape's vocabulary is larger than the tokenizer's (Llama-3.1-8B: 128,256 vs 49,152), the tokenizer is
padded with unreachable vocabulary entries (no merge produces them, so encoding is unchanged) that decode to
plain text, so every id the random model generates is a real, printable token; ``--no-pad`` leaves it as is
(the server then streams ids past the tokenizer as empty text, as a real padded-embedding model would).
"""

from __future__ import annotations

import argparse
import json
import shutil
import string
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serve.config import Settings  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
PAD_PREFIX = "Ġzq"  # byte-level BPE: "Ġ" is a space, so an extra entry decodes to " zq<letters>"


def llama3_scaling(original_context: int) -> dict:
    """Llama 3.1's RoPE scaling (factor 8) over an original context of ``original_context`` tokens."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_context,
    }


_LLAMA_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "use_cache": True,
}

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        **_LLAMA_COMMON,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": llama3_scaling(original_context=8192),
        "torch_dtype": "bfloat16",
    },
    "tiny": {  # the 8B's structure (GQA, llama3 RoPE scaling, untied head, vocab past the tokenizer) at CPU-test size
        **_LLAMA_COMMON,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 49152 + 256,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "rope_scaling": llama3_scaling(original_context=256),
        "torch_dtype": "float32",
    },
}
SHAPE_NAMES = (*SHAPES, "smollm2-135m")


def embedded_folder(cache_dir: str) -> Path:
    """The embedded GGUF converted once by the loader (tokenizer, template, config of the SmolLM2 shape)."""
    return gguf_to_folder(embedded_model_file(), cache_dir)


def shape_config(shape: str, source: Path) -> dict[str, Any]:
    """config.json of ``shape``; token ids (bos/eos/pad) always come from the embedded tokenizer's config."""
    embedded = json.loads((source / "config.json").read_text())
    if shape == "smollm2-135m":
        return {key: value for key, value in embedded.items() if not key.startswith("_")}
    config = dict(SHAPES[shape])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if embedded.get(key) is not None:
            config[key] = embedded[key]
    return config


def _letters(index: int) -> str:
    word = ""
    while True:
        index, digit = divmod(index, 26)
        word = string.ascii_lowercase[digit] + word
        if index == 0:
            return word


def pad_tokenizer(tokenizer_json: Path, vocab_size: int) -> int:
    """Add unreachable BPE entries so the tokenizer covers ``vocab_size`` ids; returns how many were added."""
    data = json.loads(tokenizer_json.read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {token["content"] for token in data.get("added_tokens", [])}
    ids = set(vocab.values()) | {token["id"] for token in data.get("added_tokens", [])}
    added, counter = 0, 0
    for token_id in range(vocab_size):
        if token_id in ids:
            continue
        while PAD_PREFIX + _letters(counter) in taken:
            counter += 1
        vocab[PAD_PREFIX + _letters(counter)] = token_id
        taken.add(PAD_PREFIX + _letters(counter))
        added += 1
    tokenizer_json.write_text(json.dumps(data, ensure_ascii=False))
    return added


def export_tokenizer(out: Path, cache_dir: str) -> Path:
    """Copy the embedded model's config.json and tokenizer files (no weights) to ``out``: a ``--source`` folder."""
    source = embedded_folder(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    return out


def write_folder(out: Path, shape: str, source: Path, pad: bool = True) -> Path:
    """Write ``out``/config.json of ``shape`` plus the tokenizer files of ``source``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    config = shape_config(shape, source)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if pad:
        added = pad_tokenizer(out / "tokenizer.json", int(config["vocab_size"]))
        if added:
            print(f"padded the tokenizer with {added} unreachable entries to {config['vocab_size']} ids")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, nargs="?")
    parser.add_argument("--shape", choices=SHAPE_NAMES, default="tiny")
    parser.add_argument("--no-pad", action="store_true", help="keep the tokenizer smaller than the model's vocab")
    parser.add_argument("--source", type=Path, help="a folder from --export-tokenizer (default: the embedded GGUF)")
    parser.add_argument("--export-tokenizer", type=Path, metavar="DIR", help="only export the tokenizer to DIR")
    parser.add_argument("--cache-dir", default=Settings().cache_dir, help="where the embedded GGUF is converted")
    args = parser.parse_args(argv)
    if args.export_tokenizer:
        print(f"embedded tokenizer and config: {export_tokenizer(args.export_tokenizer, args.cache_dir)}")
        return 0
    if args.out_dir is None:
        parser.error("OUT_DIR is required (or --export-tokenizer DIR)")
    source = args.source or embedded_folder(args.cache_dir)
    folder = write_folder(args.out_dir, args.shape, source, pad=not args.no_pad)
    print(f"{args.shape}: {folder} (serve with HF_MODEL_ID={folder} HF_MODEL_LOAD_FORMAT=dummy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
