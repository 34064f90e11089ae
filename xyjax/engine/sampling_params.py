"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling and stopping.

    temperature 0 means greedy. top_k 0 or -1 disables top-k; top_p 1 disables top-p. ``seed`` makes the
    request's samples reproducible whatever else shares its batch. ``stop`` strings end the text (they are
    not included in it); ``stop_token_ids`` and EOS end it too unless ``ignore_eos`` (EOS only). No stop
    condition fires before ``min_tokens`` tokens: EOS and stop tokens are masked until then.
    ``logprobs``: None, or N >= 0 to return each output token's logprob (of the model's distribution, before
    temperature/top-k/top-p) plus the N most likely tokens' (vLLM's convention).
    ``speculative``: False keeps the engine from drafting for this request (its ``speculative`` option).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    stop: list[str] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    logprobs: int | None = None
    speculative: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", _is_num(self.temperature) and 0 <= self.temperature < float("inf"), "a finite number >= 0"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 or -1: disabled)"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32), "None or in [0, 2**32)"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "non-negative integers"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             "None or an integer >= 0"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"an integer in [0, max_tokens={self.max_tokens}]"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {expected}, got {getattr(self, field)!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
