"""Pick the next token for every sequence of a batch at once: penalties, temperature, top-k, top-p, typical-p,
min-p, seeds; and the log-probabilities clients asked for."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from serve.engine.types import SamplingParams
from serve.engine.uploads import Uploads, default_uploads

NON_FINITE = -1  # the token id given to a row whose logits hold NaN or infinity: its sequence ends with an error
LOGPROB_FLOOR = -9999.0  # a log-probability too small for float32 is reported as this, never as -inf or NaN


def make_generator(params: SamplingParams, device: torch.device) -> Optional[torch.Generator]:
    """A private RNG for a seeded request (same seed + same request -> same text); None otherwise."""
    if params.seed is None or params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed)
    return generator


def apply_logit_bias(
    logits: torch.Tensor, params: Sequence[SamplingParams], uploads: Optional[Uploads] = None
) -> torch.Tensor:
    """OpenAI ``logit_bias``: add each request's (token, bias) pairs to its row, all rows in one indexed add.

    Biases of ±100 ban or force a token, as OpenAI documents; ids were checked against the vocabulary at the edge.
    A scatter-add over the flat logits: an accumulating ``index_put_`` on CUDA reads its indices' range back to
    the host.
    """
    entries = [(row * logits.shape[-1] + token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
    if not entries:
        return logits
    uploads = default_uploads(logits.device, uploads)
    flat, biases = zip(*entries)
    logits = logits.contiguous()
    logits.view(-1).scatter_add_(0, uploads.tensor(flat, torch.long), uploads.tensor(biases, logits.dtype))
    return logits


def prompt_scores(
    logits: torch.Tensor, targets: list[int], top: int, uploads: Optional[Uploads] = None
) -> tuple[list[float], list[tuple[tuple[int, float], ...]]]:
    """Log-probabilities of prompt tokens (row i of ``logits`` predicts ``targets[i]``) and the ``top`` most likely."""
    log_probs = torch.nan_to_num(torch.log_softmax(logits.float(), dim=-1), nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
    wanted = default_uploads(logits.device, uploads).tensor(targets, torch.long)
    picked = log_probs.gather(-1, wanted[:, None]).squeeze(-1).tolist()
    if not top:
        return picked, [()] * len(targets)
    values, ids = log_probs.topk(top, dim=-1)
    return picked, [tuple(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]


def apply_typical_p(logits: torch.Tensor, params: Sequence[SamplingParams], uploads: Uploads) -> torch.Tensor:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to ``typical_p`` mass.
    Rows are picked by an uploaded index: a Python list as an index is a blocking copy on CUDA."""
    rows = [row for row, p in enumerate(params) if p.typical_p < 1.0 and not p.greedy]
    if not rows:
        return logits
    index = uploads.tensor(rows, torch.long)
    selected = logits[index]
    log_probs = torch.log_softmax(selected, dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(dim=-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    order = distance.argsort(dim=-1, stable=True)
    sorted_probs = log_probs.gather(-1, order).exp()
    mass = uploads.tensor([params[row].typical_p for row in rows], torch.float32)[:, None]
    drop_sorted = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) >= mass
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    logits[index] = selected.masked_fill(drop, float("-inf"))
    return logits


def logprob_table(log_probs: torch.Tensor, tokens: torch.Tensor, widest: int) -> torch.Tensor:
    """[rows, 2 + 2 * widest] float64 on the device: token id, its log-probability, then the ``widest`` most likely
    ids and their log-probabilities; one tensor, so reading it is one device-to-host transfer. A row marked
    ``NON_FINITE`` keeps that mark as its token id."""
    log_probs = torch.nan_to_num(log_probs, nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR)
    chosen = log_probs.gather(-1, tokens.clamp(min=0)[:, None])
    top_values, top_ids = log_probs.topk(widest, dim=-1)
    return torch.cat([tokens[:, None].double(), chosen.double(), top_ids.double(), top_values.double()], dim=1)


def unpack_logprobs(row: list[float], k: int, widest: int) -> tuple[int, float, tuple[tuple[int, float], ...]]:
    """One row of ``logprob_table`` read on the host: (token, log-probability, its k best alternatives)."""
    ids, values = row[2 : 2 + k], row[2 + widest : 2 + widest + k]
    return int(row[0]), row[1], tuple((int(token), value) for token, value in zip(ids, values))


def finite_rows(logits: torch.Tensor) -> torch.Tensor:
    """[rows] bool on the device: True where a row of the model's logits holds only finite numbers. A row's largest
    value is NaN when it holds a NaN (the reductions propagate it) and infinite when it holds +inf, its smallest
    when it holds -inf: two reductions, a twentieth of ``isfinite(...).all()``'s time on the CPU."""
    return torch.isfinite(logits.amax(dim=-1)) & torch.isfinite(logits.amin(dim=-1))


def mark_non_finite(tokens: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """``tokens`` with ``NON_FINITE`` in the rows whose logits were not finite (read back with the tokens, in the
    same transfer)."""
    return torch.where(finite, tokens, torch.full_like(tokens, NON_FINITE))


def _seeded_noise(generators: Sequence[torch.Generator], vocab: int, device: torch.device) -> torch.Tensor:
    """[rows, vocab] Exp(1) noise, one number per token, each seeded row from its own generator (as -log of a
    uniform: a fifth of ``exponential_``'s cost on the CPU). Never zero, so no kept token's time is infinite."""
    uniforms = torch.stack([torch.rand(vocab, generator=generator, device=device) for generator in generators])
    return (
        uniforms.clamp_(min=torch.finfo(uniforms.dtype).tiny).log_().neg_().clamp_(min=torch.finfo(uniforms.dtype).tiny)
    )


def _by_rank(probs: torch.Tensor, sorted_ids: torch.Tensor) -> torch.Tensor:
    """One token per row by an inverse CDF over ``probs`` in likelihood order: one uniform per row, one call for the
    whole batch (rows without a seed, whose draws nobody replays)."""
    cdf = torch.cumsum(probs, dim=-1)
    draw = torch.rand(probs.shape[0], device=probs.device) * cdf[:, -1]
    position = torch.searchsorted(cdf, draw[:, None]).clamp(max=probs.shape[-1] - 1)
    return sorted_ids.gather(-1, position).squeeze(-1)


def _seeded(
    probs: torch.Tensor, sorted_ids: torch.Tensor, generators: Sequence[Optional[torch.Generator]], uploads: Uploads
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """The seeded rows' tokens by ``race`` over their probabilities in token-id order: a seed keeps its tokens
    whatever the step's shape (see ``race``)."""
    rows = [row for row, generator in enumerate(generators) if generator is not None]
    if not rows:
        return None
    index = uploads.tensor(rows, torch.long)
    kept = torch.zeros_like(probs[index]).scatter_(-1, sorted_ids[index], probs[index])  # back in token-id order
    noise = _seeded_noise([generators[row] for row in rows], probs.shape[-1], probs.device)
    return index, race(kept, noise)


def sample_next_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[Optional[torch.Generator]],
    uploads: Optional[Uploads] = None,
) -> torch.Tensor:
    """Return one token id per row of ``logits`` [batch, vocab] (penalties already applied); greedy rows take the
    argmax. ``uploads``: the runner's uploader for the per-row parameters (a private one when not given)."""
    uploads = default_uploads(logits.device, uploads)
    logits = apply_logit_bias(logits.float(), params, uploads)
    greedy_choice = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy_choice
    device = logits.device
    rows = [
        (
            p.temperature if not p.greedy else 1.0,
            p.top_k if p.top_k > 0 else logits.shape[-1],
            p.top_p,
            p.min_p,
            p.greedy,
        )
        for p in params
    ]
    temperature, top_k, top_p, min_p, is_greedy = uploads.tensor(rows, torch.float32).T  # one copy

    logits = apply_typical_p(logits / temperature[:, None], params, uploads)
    sorted_logits, sorted_ids = torch.sort(logits, dim=-1, descending=True, stable=True)  # ties: lower id first
    ranks = torch.arange(logits.shape[-1], device=device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    probs = probs.masked_fill(probs < min_p[:, None] * probs[:, :1], 0.0)
    sampled = _by_rank(probs, sorted_ids)
    seeded = _seeded(probs, sorted_ids, generators, uploads)
    if seeded is not None:
        index, tokens = seeded
        sampled[index] = tokens
    return torch.where(is_greedy.bool(), greedy_choice, sampled)


def race(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [rows, vocab], with those probabilities: each token's Exp(1) ``noise`` over
    its probability is its finishing time, and the first to finish wins (a token of probability 0 never does).

    Each token id has its own noise, so the draw does not hinge on the order of likelihood: the same row computed
    over another step shape (its prompt cached or not, chunked otherwise, other sequences in the batch) may differ
    in the last bits of its logits, which swaps near-tied tokens by rank and would move a draw by rank (an inverse
    CDF in sorted order) onto another token. Here such a change moves every time by a rounding error, far less than
    the gap between the first two to finish, so a seed keeps its tokens.
    """
    return (probs / noise).argmax(dim=-1)
