"""Host-side state of one request."""

from __future__ import annotations

import dataclasses
import enum

from xyjax.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    """``token_ids`` = prompt + output; the KV of the first ``num_computed`` of them is in ``block_table``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int
    token_ids: list[int] = dataclasses.field(default_factory=list)
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    detokenizer: object = None

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is still to be computed (the whole prompt at first, then 1 per decode step)."""
        return len(self.token_ids) - self.num_computed
