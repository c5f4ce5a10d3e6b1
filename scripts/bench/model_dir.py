"""The model folder the benchmark uses, made in the project venv: ``python model_dir.py WORK_DIR``.

Our loader converts the embedded GGUF once to a plain safetensors folder (cached by the loader). vLLM and
`transformers serve` load that same folder, so every system serves identical weights.

Prints ``MODEL_DIR <path>`` and ``PEER_MODEL_DIR <path>`` (the same folder).
"""

from __future__ import annotations

import sys
from pathlib import Path


def loader_folder() -> Path:
    """The safetensors folder our loader makes from the embedded GGUF."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `serve`
    from serve.config import load_settings
    from serve.loading.source import embedded_model_file, gguf_to_folder

    return gguf_to_folder(embedded_model_file(), load_settings().cache_dir)


def main(argv: list[str]) -> None:
    source = loader_folder()
    print(f"MODEL_DIR {source}", flush=True)
    print(f"PEER_MODEL_DIR {source}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
