"""SPECULATIVE=draft:<model id or path>: the draft model speculative decoding proposes with, found as the target is
(a local folder, a .gguf file or a hub id), loaded beside it on its device and in its dtype (the lean model or
transformers' model code, as for the target), and refused when its vocabulary differs from the target's.

SPECULATIVE=eagle3:<heads id or path>: an EAGLE-3 head in the published checkpoint format (serve/modeling/eagle3.py),
found the same way, refused when it does not fit the target (its states' size, layers or vocabulary)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

from serve.config import Settings
from serve.loading.cpu_weights import pack_cpu_weights
from serve.loading.placement import EnginePlacement
from serve.loading.quantize import Quantization
from serve.loading.source import ModelLoadError, local_folder, resolve_source
from serve.modeling.weights import CheckpointMismatch

if TYPE_CHECKING:
    from serve.loading.loader import PreparedModel

log = logging.getLogger(__name__)


def refuse_draft_with_tensor_parallel(settings: Settings, ranks: int) -> None:
    """ModelLoadError when a draft model is asked for a copy split over ``ranks`` > 1 tensor-parallel ranks."""
    if settings.speculative in ("draft", "eagle3") and ranks > 1:
        raise ModelLoadError(
            f"SPECULATIVE={settings.speculative}:{settings.speculative_draft} does not run under tensor parallelism "
            f"yet ({ranks} "
            "ranks per copy): set TENSOR_PARALLEL_SIZE=1, or use SPECULATIVE=ngram"
        )


def load_draft(settings: Settings, prepared: "PreparedModel", target: Any, tokenizer: Any) -> Optional[Any]:
    """The draft model SPECULATIVE=draft names, on the target's device and in its dtype (None: no draft asked for);
    ModelLoadError when it cannot load or its vocabulary differs from the target's."""
    from serve.loading.loader import _LOAD_LOCK, _from_pretrained, _load_lean  # the loader imports this module

    if settings.speculative == "eagle3":
        return load_eagle3(settings, prepared, target)
    if settings.speculative != "draft":
        return None
    started = time.monotonic()
    named = f"SPECULATIVE=draft:{settings.speculative_draft}"
    draft_settings = replace(settings, model_id=settings.speculative_draft, model_revision=None)
    source = resolve_source(draft_settings)
    folder = local_folder(source, draft_settings)
    draft_prepared = replace(prepared, source=source, folder=folder, quantization=Quantization(), adapters={})
    device = target.device
    with _LOAD_LOCK:
        loaded = _load_lean(draft_prepared, draft_settings, EnginePlacement((str(device),)))
        kwargs = {} if device.type == "cpu" else {"device_map": str(device)}
        model, draft_tokenizer = loaded or _from_pretrained(folder, draft_settings, prepared.dtype, kwargs)
    mismatch = vocabulary_mismatch(target, tokenizer, model, draft_tokenizer)
    if mismatch is not None:
        raise ModelLoadError(f"{named}: {mismatch}; a draft model must share the target's tokenizer")
    if device.type == "cpu":
        pack_cpu_weights(model, settings)
    log.info("draft model loaded in %.1f s: %s on %s", time.monotonic() - started, source.name, model.device)
    return model


def load_eagle3(settings: Settings, prepared: "PreparedModel", target: Any) -> Any:
    """The EAGLE-3 head SPECULATIVE=eagle3 names, on the target's device and in its dtype; ModelLoadError when it
    cannot load or does not fit the target."""
    from serve.modeling.eagle3 import load_eagle3_head

    started = time.monotonic()
    named = f"SPECULATIVE=eagle3:{settings.speculative_draft}"
    head_settings = replace(settings, model_id=settings.speculative_draft, model_revision=None)
    source = resolve_source(head_settings)
    if source.kind not in ("local", "hub"):
        raise ModelLoadError(f"{named}: an EAGLE-3 head is a folder or a hub id (config.json and its weights)")
    folder = local_folder(source, head_settings)
    try:
        head = load_eagle3_head(folder, target, target.device, prepared.dtype, settings.allow_unsafe_weights)
    except (CheckpointMismatch, OSError, ValueError) as exc:
        raise ModelLoadError(f"{named}: {exc}") from exc
    log.info(
        "EAGLE-3 head loaded in %.1f s: %s on %s, reading the target's layers %s",
        time.monotonic() - started,
        source.name,
        head.device,
        list(head.aux_layers),
    )
    return head


def vocabulary_mismatch(target: Any, tokenizer: Any, draft: Any, draft_tokenizer: Any) -> Optional[str]:
    """How the draft's vocabulary differs from the target's (None: it proposes token ids the target reads alike):
    the tokenizers' vocabularies must be equal, and the draft's output rows no more than the target's input rows
    (a draft may lack padding rows the target has: each id still means the same token)."""
    vocab, draft_vocab = tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    if vocab != draft_vocab:
        differ = len(set(vocab.items()) ^ set(draft_vocab.items()))
        return (
            f"its tokenizer's vocabulary differs from the target's ({len(draft_vocab)} tokens against "
            f"{len(vocab)}, {differ} entries not in both)"
        )
    rows = target.config.get_text_config().vocab_size
    draft_rows = draft.config.get_text_config().vocab_size
    if draft_rows > rows:
        return f"its model's vocabulary size ({draft_rows}) exceeds the target's ({rows})"
    return None
