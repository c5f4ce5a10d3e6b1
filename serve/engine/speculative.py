"""Speculative decoding: guess a few tokens of a sequence cheaply, let one forward pass score them all, keep the
longest run the model agrees with plus the model's own next token.

The n-gram proposer (prompt lookup) finds the most recent earlier place where the sequence's last ``n`` tokens
occurred (in the prompt or the output so far) and proposes the ``k`` tokens that followed there; it needs no model.
The draft proposer (serve/engine/draft.py) proposes a small model's ``k`` greedy tokens; the EAGLE-3 proposer
(serve/engine/eagle3.py) those of a head that reads the target's own hidden states.

Acceptance keeps the target distribution exactly. The runner samples a token ``t_i`` from each of the k+1 scored
rows as it would without speculation (argmax for greedy rows); proposal ``d_i`` is accepted while ``t_i == d_i``,
and the first disagreeing ``t_i`` is the step's last token. For a proposer whose guess is one token (a one-hot q),
this is the rejection rule itself: ``d`` is accepted with probability p(d), and when rejected the token comes from
p with ``d`` removed and renormalised, which is what a draw from p conditioned on being other than ``d`` is.

Rows that use penalties, a grammar, ``logit_bias``, a watermark, seeded sampling or a LoRA adapter, or that score
their prompt, never get proposals (their next distribution depends on state a proposal cannot carry, or their draws must
replay); they decode one token a step as without speculation.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

MAX_SPECULATIVE_BATCH = 4  # decode rows in a step above which nobody proposes (verification costs more than it saves)
LOW_ACCEPTANCE = 0.25  # a row whose recent accepted share falls below this proposes only every PROBE_EVERY steps
PROBE_EVERY = 8
ACCEPTANCE_DECAY = 0.5  # weight of the older history in a row's running accepted share


@dataclass(frozen=True)
class SpeculativeConfig:
    """SPECULATIVE (``off``, ``ngram``, ``draft`` or ``eagle3``), SPECULATIVE_TOKENS (k, tokens proposed per step),
    SPECULATIVE_NGRAM (n, the tokens a prompt lookup matches) and the draft model's or head's source
    (``draft:<source>``, ``eagle3:<source>``)."""

    method: str = "off"
    tokens: int = 4
    ngram: int = 3
    draft: Optional[str] = None

    @property
    def enabled(self) -> bool:
        return self.method != "off"

    def describe(self) -> str:
        """What runs, in words (for /info and the log)."""
        if not self.enabled:
            return "off"
        if self.method == "draft":
            return f"draft ({self.draft}): {self.tokens} tokens proposed per step, the draft model's greedy tokens"
        if self.method == "eagle3":
            return f"eagle3 ({self.draft}): {self.tokens} tokens proposed per step, the EAGLE-3 head's greedy tokens"
        return f"{self.method}: {self.tokens} tokens proposed per step, matching the last {self.ngram} tokens"


def ngram_proposal(tokens: list[int], n: int, k: int) -> list[int]:
    """``k`` tokens that followed the most recent earlier occurrence of the last ``n`` of ``tokens`` (a match
    whose continuation reaches the end goes on copying what it proposes: a repeating run repeats); none without a
    match."""
    if k <= 0 or len(tokens) <= n:
        return []
    tail = tokens[-n:]
    for start in range(len(tokens) - n - 1, -1, -1):
        if tokens[start : start + n] == tail:
            proposal: list[int] = []
            for index in range(start + n, start + n + k):
                proposal.append(tokens[index] if index < len(tokens) else proposal[index - len(tokens)])
            return proposal
    return []


Reserve = Callable[[Any, int], int]  # (sequence, proposed tokens) -> how many of them its KV blocks now hold


class Proposer(ABC):
    """Guesses the tokens that follow a sequence; the Speculator asks it for each step's proposals and tells it each
    verified outcome (``settle``) and each sequence that stops running (``forget``)."""

    name = ""

    @abstractmethod
    def propose(self, seq: Any, k: int) -> list[int]:
        """Up to ``k`` tokens to follow ``seq``'s last one."""

    def propose_rows(self, rows: list[tuple[Any, int]], reserve: Reserve) -> list[list[int]]:
        """Each row's proposal: ``rows`` pairs a sequence with the most tokens it may get; ``reserve`` takes the KV
        blocks for a proposal and says how much of it fits (a proposal never outgrows its blocks)."""
        proposals = []
        for seq, k in rows:
            proposal = self.propose(seq, k)
            proposals.append(proposal[: reserve(seq, len(proposal))] if proposal else [])
        return proposals

    def settle(self, seq: Any) -> None:
        """``seq``'s proposal was verified: its ``num_cached`` now counts the accepted tokens."""

    def forget(self, seq: Any) -> None:
        """``seq`` stopped running (finished or preempted)."""


class NgramProposer(Proposer):
    """Prompt lookup over the prompt and the output so far."""

    name = "ngram"

    def __init__(self, n: int):
        self.n = n

    def propose(self, seq: Any, k: int) -> list[int]:
        return ngram_proposal(seq.all_ids, self.n, k)


def may_speculate(seq: Any) -> bool:
    """Whether a row's next tokens may be proposed (see the module's docstring for the rows that may not)."""
    params, request = seq.request.params, seq.request
    return not (
        params.repetition_penalty != 1.0
        or params.frequency_penalty
        or params.presence_penalty
        or params.grammar is not None
        or params.logit_bias
        or params.watermark is not None
        or (params.seed is not None and not params.greedy)
        or params.prompt_logprobs
        or request.adapter is not None
        or seq.matcher is not None
    )


def accepted_length(proposal: list[int], targets: list[int]) -> int:
    """How many proposed tokens agree with the tokens sampled from the rows before them."""
    count = 0
    for proposed, target in zip(proposal, targets):
        if proposed != target:
            break
        count += 1
    return count


@dataclass
class SpeculationStats:
    """Counters since start: tokens proposed and accepted, and how many steps accepted each length (index 0..k)."""

    proposer: str = ""
    proposed: int = 0
    accepted: int = 0
    accepted_lengths: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        if len(self.accepted_lengths) <= accepted:
            self.accepted_lengths.extend([0] * (accepted + 1 - len(self.accepted_lengths)))
        self.accepted_lengths[accepted] += 1


class Speculator:
    """Chooses each step's proposals and keeps the counts; the scheduler calls it, the runner verifies."""

    def __init__(self, config: SpeculativeConfig, proposer: Optional[Proposer] = None):
        self.config = config
        self.proposer = proposer or NgramProposer(config.ngram)
        self.max_batch = MAX_SPECULATIVE_BATCH
        self.stats = SpeculationStats(self.proposer.name, accepted_lengths=[0] * (config.tokens + 1))
        self._share: dict[str, float] = {}  # request id -> running accepted share
        self._idle: dict[str, int] = {}  # request id -> steps since a low-acceptance row last proposed

    def wanted(self, seq: Any, batch: int) -> int:
        """How many tokens ``seq`` may have proposed this step: none under load, for rows that may not speculate,
        past ``max_new_tokens``, or for a row whose recent proposals mostly failed, between probes."""
        if batch > self.max_batch or not may_speculate(seq):
            return 0
        room = seq.request.params.max_new_tokens - len(seq.output_ids) - 1
        if room <= 0 or not self._due(seq.id):
            return 0
        return min(self.config.tokens, room)

    def propose(self, seq: Any, batch: int) -> list[int]:
        """The tokens to verify after ``seq``'s last one this step (``wanted`` says how many at most)."""
        k = self.wanted(seq, batch)
        return self.proposer.propose(seq, k) if k else []

    def _due(self, request_id: str) -> bool:
        if self._share.get(request_id, 1.0) >= LOW_ACCEPTANCE:
            return True
        self._idle[request_id] = self._idle.get(request_id, 0) + 1
        return self._idle[request_id] % PROBE_EVERY == 0

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """One verified proposal's outcome."""
        self.stats.record(proposed, accepted)
        share = accepted / proposed
        self._share[request_id] = ACCEPTANCE_DECAY * self._share.get(request_id, share) + (1 - ACCEPTANCE_DECAY) * share

    def forgetting(self, forget: Callable[[Any], None]) -> Callable[[Any], None]:
        """``forget`` that also drops this speculator's history of the sequence."""

        def both(seq: Any) -> None:
            forget(seq)
            self.proposer.forget(seq)
            self._share.pop(seq.id, None)
            self._idle.pop(seq.id, None)

        return both

    def plan(self, decode: list[Any], blocks: Any, headroom: int) -> None:
        """Give each decoding sequence its proposal for this step, with the blocks to verify it in: blocks beyond
        ``headroom`` free ones only (a proposal never preempts anyone; it is cut to the room there is)."""
        rows = [(seq, self.wanted(seq, len(decode))) for seq in decode]
        rows = [(seq, k) for seq, k in rows if k > 0]
        if not rows:
            return
        reserve = lambda seq, count: self._reserve(seq, count, blocks, headroom)  # noqa: E731
        for (seq, _), proposal in zip(rows, self.proposer.propose_rows(rows, reserve)):
            seq.proposal = proposal
            blocks.shrink(seq.block_table, blocks.blocks_for(seq.num_cached + 1 + len(proposal)))

    @staticmethod
    def _reserve(seq: Any, count: int, blocks: Any, headroom: int) -> int:
        """Take the blocks ``count`` proposed tokens after ``seq``'s last one need, beyond ``headroom`` free ones;
        returns how many of them fit."""
        needed = blocks.blocks_for(seq.num_cached + 1 + count)
        while len(seq.block_table) < needed and blocks.free_blocks > headroom:
            blocks.append_block(seq.block_table)
        return max(0, min(count, len(seq.block_table) * blocks.block_size - seq.num_cached - 1))

    def settle(self, decode: list[Any], sampled: list[Any], blocks: Any) -> None:
        """Count each verified proposal's outcome (its sequence got one token more than it accepted) and give back
        the tail blocks that held rejected tokens."""
        made: dict[str, int] = {}
        for seq in sampled:
            made[seq.id] = made.get(seq.id, 0) + 1
        for seq in decode:
            if not seq.proposal:
                continue
            if seq.id in made:
                self.record(seq.id, len(seq.proposal), made[seq.id] - 1)
                self.proposer.settle(seq)
            seq.proposal = []
            if seq.block_table:
                blocks.shrink(seq.block_table, blocks.blocks_for(seq.num_cached))


def accept_proposals(sampled: list[Any], choices: list[Any]) -> tuple[list[Any], list[Any]]:
    """The step's output with each verified run cut to its accepted tokens plus the next: ``sampled`` holds a
    verifying sequence once per scored row (its last token's, then each proposed one's). Each verifying sequence's
    ``num_cached`` grows by the proposed tokens it kept (their keys and values stay)."""
    sequences, kept, index = [], [], 0
    while index < len(sampled):
        seq = sampled[index]
        rows = choices[index : index + len(seq.proposal) + 1]
        accepted = accepted_length(seq.proposal, [choice.token_id for choice in rows])
        seq.num_cached += accepted
        sequences.extend([seq] * (accepted + 1))
        kept.extend(rows[: accepted + 1])
        index += len(rows)
    return sequences, kept


def make_speculator(config: Any, proposer: Optional[Proposer] = None) -> Optional[Speculator]:
    """The Speculator an EngineConfig asks for (None: SPECULATIVE=off), proposing with ``proposer`` under
    SPECULATIVE=draft or eagle3 (a model's); the log says what runs."""
    settings = speculative_config(config)
    log.info("speculative decoding: %s", settings.describe())
    with_model = settings.method in ("draft", "eagle3")
    if with_model and proposer is None:
        raise ValueError(f"SPECULATIVE={settings.method} needs its model loaded beside the target")
    return Speculator(settings, proposer if with_model else None) if settings.enabled else None


def speculative_config(config: Any) -> SpeculativeConfig:
    """An EngineConfig's SPECULATIVE, SPECULATIVE_TOKENS, SPECULATIVE_NGRAM and draft model."""
    draft = getattr(config, "speculative_draft", None)
    return SpeculativeConfig(config.speculative, config.speculative_tokens, config.speculative_ngram, draft)


def speculative_description(config: Any) -> str:
    """What an EngineConfig's SPECULATIVE runs, in words (``off``, or the proposer, k and n or the draft)."""
    return speculative_config(config).describe()
