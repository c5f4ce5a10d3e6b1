"""TGI's ``watermark``: each step, a green list of tokens drawn from the previous token gets a bias.

The scheme of Kirchenbauer et al. ("A Watermark for Large Language Models"), with TGI's parameters: a generator
seeded with ``HASH_KEY`` times the previous token draws a permutation of the vocabulary; its first ``gamma`` share
is the green list, whose logits get ``delta`` added. A detector that knows ``gamma`` and ``HASH_KEY`` counts the
green tokens of a text and tests that count against ``gamma``.
"""

from __future__ import annotations

from typing import Optional

import torch

from serve.engine.sequence import Sequence
from serve.engine.uploads import Uploads, default_uploads

HASH_KEY = 15485863  # TGI's key (the millionth prime), so TGI's detector reads these texts too


def green_list(previous_token: int, vocab_size: int, gamma: float) -> torch.Tensor:
    """The token ids favoured after ``previous_token``: the first ``gamma`` share of a seeded permutation."""
    generator = torch.Generator().manual_seed(HASH_KEY * previous_token)
    return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)]


def apply_watermarks(
    logits: torch.Tensor, sequences: list[Sequence], uploads: Optional[Uploads] = None
) -> torch.Tensor:
    """Add each watermarked row's ``delta`` to its green list, in place (other rows are left alone). The lists are
    drawn on the host (a CPU generator, as TGI's detector draws them) and uploaded without a blocking copy."""
    uploads = default_uploads(logits.device, uploads)
    for row, seq in enumerate(sequences):
        mark = seq.request.params.watermark
        if mark is None:
            continue
        previous = seq.output_ids[-1] if seq.output_ids else seq.request.prompt_ids[-1]
        green = uploads.tensor(green_list(previous, logits.shape[-1], mark.gamma), torch.long)
        logits[row, green] += mark.delta
    return logits
