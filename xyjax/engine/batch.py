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
    ``num_samples``: rows sampled, fixed when scheduled: 1 + drafts for V, 0 for a prefill chunk that does not
    reach the end of the tokens, else 1."""

    request: Request
    stage: Stage
    num_tokens: int
    num_samples: int = dataclasses.field(init=False)

    def __post_init__(self):
        req, n = self.request, self.num_tokens
        self.num_samples = n if self.stage is Stage.VERIFY else int(req.num_computed + n == len(req.token_ids))


@dataclasses.dataclass
class ScheduledBatch:
    """``copies``: (source, destination) KV blocks to copy, in order, before the step runs (copy-on-write)."""

    seqs: list[ScheduledSeq]
    preempted: list[Request]
    copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)
