"""What the scheduler hands on for one step: the scheduled sequences (stage, tokens, sampled rows) and KV copies."""

from __future__ import annotations

import dataclasses
import enum

from xyjax.engine.request import Request


class Stage(enum.Enum):
    PREFILL = "P"
    DECODE = "D"
    VERIFY = "V"


@dataclasses.dataclass
class ScheduledSeq:
    """``request`` computes its next ``num_tokens`` tokens (for V: the pending token, then its drafts).
    Fixed when scheduled: ``appends``, whether the step appends a sampled token (D, V, and a prefill chunk that
    reaches the end of the tokens); ``num_samples``, rows sampled: 1 + drafts for V, every row for a prefill chunk
    of a request that scores its prompt (Request.scores_prompt; the last row samples when it ``appends``), else
    1 if it ``appends``, else 0."""

    request: Request
    stage: Stage
    num_tokens: int
    appends: bool = dataclasses.field(init=False)
    num_samples: int = dataclasses.field(init=False)

    def __post_init__(self):
        req, n = self.request, self.num_tokens
        self.appends = self.stage is not Stage.PREFILL or req.num_computed + n == len(req.token_ids)
        every = self.stage is Stage.VERIFY or (self.stage is Stage.PREFILL and req.scores_prompt)
        self.num_samples = n if every else int(self.appends)


@dataclasses.dataclass
class ScheduledBatch:
    """``copies``: (source, destination) KV blocks to copy, in order, before the step runs (copy-on-write)."""

    seqs: list[ScheduledSeq]
    preempted: list[Request]
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)
