"""SPECULATIVE=eagle3: an EAGLE-3 head proposes from the target's own hidden states.

Every target forward leaves the states at the head's layers (``HiddenCapture``); after it, the runner hands the
step's spans to ``Eagle3Proposer.record``, which folds the states of sequences that may speculate (the head's
``fc``) and saves them by position. The head's cache (one layer, the target's block tables, as the draft model's)
holds positions whose keys and values came from the target's states. To propose, the head first catches up on
the saved positions up to the sequence's last cached one (at position p: the embedding of token p + 1 and the
target's state at p); its guess there is the first proposal, and each later guess takes the previous one and the
head's own output state. Keys and values written for guesses are stale once the target verifies: the head's
cached count never includes them, so the next catch-up overwrites them with the target's states.

A sequence that proposes rarely (a busy batch) would save states without bound: past ``CATCH_UP_AT`` saved
positions the head catches up at once, keeping the last position for the next proposal. A sequence first seen past
its start (a prefix-cache hit) takes the head's cache of the shared blocks as it is. On CUDA the lean model keeps
the states inside its decode graphs (serve/engine/graphs.py hands each replay's to the model); a transformers
model's hooks do not run in a replay, so the engine captures no graphs for it under eagle3 (its log says so).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from serve.engine.attention import active_step
from serve.engine.draft import CachedProposer, add_chunk, decode_rows
from serve.engine.kv_cache import PagedKVCache
from serve.engine.speculative import Reserve, may_speculate
from serve.engine.step_inputs import Span, StepInputs
from serve.engine.uploads import Uploads


CATCH_UP_AT = 64  # saved positions of a sequence past which the head catches up without being asked to propose


class HiddenCapture:
    """The input states of the target's layers ``layers``, for every token of its last forward: the lean model
    saves them itself (``serve_aux_layers``), a transformers model through forward pre-hooks on its layers."""

    def __init__(self, model: Any, layers: tuple[int, ...]):
        self.layers = layers
        self._model = model
        self._states: dict[int, torch.Tensor] = {}  # a transformers model's, filled by the hooks
        self._lean = hasattr(model, "serve_aux_layers")
        if self._lean:
            model.serve_aux_layers = frozenset(layers)
            return
        decoder_layers = model.get_decoder().layers
        for index in set(layers):
            decoder_layers[index].register_forward_pre_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int) -> Any:
        def save(_module: Any, args: tuple, kwargs: dict) -> None:
            state = args[0] if args else kwargs["hidden_states"]
            self._states[index] = state.reshape(-1, state.shape[-1])

        return save

    def take(self) -> Optional[list[torch.Tensor]]:
        """The last forward's states, in the head's layer order ([tokens, hidden] each; None: none captured)."""
        if self._lean:
            states, self._model.serve_aux_hidden = self._model.serve_aux_hidden, {}
        else:
            states, self._states = self._states, {}
        if any(index not in states for index in self.layers):
            return None
        return [states[index] for index in self.layers]


class Eagle3Proposer(CachedProposer):
    """Proposes an EAGLE-3 head's greedy tokens, batched over the rows that propose in a step."""

    name = "eagle3"

    def __init__(self, head: Any, target: Any, cache: PagedKVCache):
        self.head, self.cache = head, cache
        self.embed = head.embed_tokens if head.embed_tokens is not None else target.get_input_embeddings()
        self.capture = HiddenCapture(target, head.aux_layers)
        self.uploads = Uploads(head.device)  # the step inputs' staging buffers (pinned on CUDA)
        self._cached: dict[str, int] = {}  # sequence id -> leading positions the head's cache holds from the target
        self._saved: dict[str, torch.Tensor] = {}  # sequence id -> folded states from its cached count on

    @classmethod
    def build(
        cls, head: Any, target: Any, num_blocks: int, block_size: int, dtype: torch.dtype, config: Any
    ) -> "Eagle3Proposer":
        """The proposer over ``head`` with a cache of the target's blocks (``own_cache``)."""
        return cls(head, target, cls.own_cache(head, num_blocks, block_size, dtype, config))

    # --- after each target forward ------------------------------------------------------------------------------

    @torch.inference_mode()
    def record(self, spans: list[Span]) -> None:
        """Save the folded states of the step's tokens for the sequences that may speculate; catch up where many
        are saved."""
        states = self.capture.take()
        wanted = [span for span in spans if may_speculate(span[0])]
        if states is None or not wanted or self.failure is not None:
            return
        device = states[0].device
        rows = torch.cat([torch.arange(row, row + count, device=device) for _, row, _, count in wanted])
        folded = self.head.fold([state.index_select(0, rows) for state in states])
        offset = 0
        for seq, _, first, count in wanted:
            self._save(seq, first, folded[offset : offset + count])
            offset += count
        long = [(seq, end) for seq, _, _, _ in wanted if (end := self._catch_up_end(seq)) is not None]
        if long:
            self._guarded(lambda: self._catch_up(long))

    def _save(self, seq: Any, first: int, states: torch.Tensor) -> None:
        """Saved states of ``seq`` from its cached count through ``first`` + len(states); a gap restarts them."""
        start = self._cached.setdefault(seq.id, first)
        held = self._saved.get(seq.id, states[:0])
        if first > start + len(held):  # positions the head never saw: it goes on from here
            self._cached[seq.id], start, held = first, first, states[:0]
        elif first < start:
            states, first = states[start - first :], start
        self._saved[seq.id] = torch.cat((held[: first - start], states))

    def _catch_up_end(self, seq: Any) -> Optional[int]:
        """Where an unasked catch-up of ``seq`` ends (None: not due): the positions whose next token is known, less
        the last, once ``CATCH_UP_AT`` of them are saved."""
        start = self._cached.get(seq.id, 0)
        end = min(start + len(self._saved.get(seq.id, ())), len(seq.all_ids) - 1) - 1
        return end if end - start >= CATCH_UP_AT else None

    # --- proposing ----------------------------------------------------------------------------------------------

    def propose_rows(self, rows: list[tuple[Any, int]], reserve: Reserve) -> list[list[int]]:
        ready = [(seq, k) for seq, k in rows if self.failure is None and self._ready(seq)]
        counts = {seq.id: reserve(seq, k) for seq, k in ready}
        active = [(seq, counts[seq.id]) for seq, _ in ready if counts[seq.id] > 0]
        drafted = dict(zip((seq.id for seq, _ in active), self._guarded(lambda: self._draft(active)) or []))
        return [drafted.get(seq.id, []) for seq, _ in rows]

    def _ready(self, seq: Any) -> bool:
        """Whether the head holds or saved every position of ``seq`` up to its last cached one."""
        start = self._cached.get(seq.id)
        return start is not None and start < seq.num_cached <= start + len(self._saved.get(seq.id, ()))

    def settle(self, seq: Any) -> None:
        """Nothing to cut: the head's cached count never includes guessed positions."""

    def forget(self, seq: Any) -> None:
        self._cached.pop(seq.id, None)
        self._saved.pop(seq.id, None)

    def reset(self) -> None:
        self._cached.clear()
        self._saved.clear()

    @torch.inference_mode()
    def _draft(self, rows: list[tuple[Any, int]]) -> list[list[int]]:
        """Each row's ``count`` guesses after its last token (one host read for all of them)."""
        if not rows:
            return []
        widest = max(count for _, count in rows)
        tokens = torch.zeros((len(rows), widest), dtype=torch.long, device=self.head.device)
        tokens[:, 0], state = self._catch_up([(seq, seq.num_cached) for seq, _ in rows])
        for step in range(1, widest):
            live = [index for index, (_, count) in enumerate(rows) if count > step]
            chosen = torch.tensor(live, dtype=torch.long, device=self.head.device)
            positions = [rows[index][0].num_cached - 1 + step for index in live]
            inputs = decode_rows([rows[index][0] for index in live], positions, self.cache.block_size)
            guessed, live_state = self._forward(inputs, state[chosen], tokens[chosen, step - 1])
            tokens[chosen, step] = guessed
            state = state.index_copy(0, chosen, live_state)
        return [row[:count] for row, (_, count) in zip(tokens.tolist(), rows)]

    def _catch_up(self, ends: list[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the head over each sequence's saved positions before ``end``: (its guess at the last one, the head's
        output state there), a row per sequence; the head's cache then holds them."""
        inputs = StepInputs([], [], [], [], [], [], [])
        states = []
        for seq, end in ends:
            start = self._cached[seq.id]
            add_chunk(inputs, seq, start, seq.all_ids[start + 1 : end + 1], self.cache.block_size)
            states.append(self._saved[seq.id][: end - start])
        guessed, state = self._forward(inputs, torch.cat(states))
        for seq, end in ends:
            self._saved[seq.id] = self._saved[seq.id][end - self._cached[seq.id] :]
            self._cached[seq.id] = end
        return guessed, state

    def _forward(
        self, inputs: StepInputs, states: torch.Tensor, ids: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The head over one laid-out step (``ids``: the token ids, already on the device): its guesses and output
        states at the kept rows."""
        input_ids, positions, layout, keep = inputs.tensors(self.uploads, self.cache.block_size)
        with active_step(self.cache, layout):
            return self.head(self.embed(input_ids if ids is None else ids), states, positions, keep)
