"""Export the embedded SmolLM2 as a plain transformers folder, as a SageMaker model.tar.gz unpacks at /opt/ml/model.

Usage: python scripts/image/export_model.py DEST  (DEST is replaced). The conversion is the server's own
(serve.loading.source.gguf_to_folder, cached under SERVE_CACHE_DIR); the files are hard-linked when possible.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from serve.config import load_settings  # noqa: E402
from serve.loading.source import embedded_model_file, gguf_to_folder  # noqa: E402


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def export_embedded_model(dest: Path) -> Path:
    """Convert (once) and place the embedded model's config, tokenizer and safetensors weights in ``dest``."""
    folder = gguf_to_folder(embedded_model_file(), load_settings().cache_dir)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest, copy_function=_link_or_copy)
    dest.chmod(0o755)  # readable by whichever user the container runs as, like an unpacked model.tar.gz
    for path in dest.iterdir():
        path.chmod(0o644)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to create (mounted at /opt/ml/model by make docker-run)")
    dest = export_embedded_model(parser.parse_args().dest)
    print(dest)


if __name__ == "__main__":
    main()
