"""What the engine hands back: per-request outputs (whole or as step deltas) and their metrics."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RequestMetrics:
    """Timestamps (``time.perf_counter()`` seconds) and counts of one request."""

    arrival_time: float
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    num_draft_tokens: int = 0            # speculative tokens verified for it, and of those accepted
    num_accepted_tokens: int = 0

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to the first step that ran it."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first (None until finished with >= 2 tokens)."""
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclasses.dataclass
class RequestOutput:
    """The result of one request, or (from ``Engine.step``) what it produced in that step.

    ``finish_reason`` is "stop" (EOS, stop token or stop string), "length" (max_tokens or the context
    length), "abort" or "error" (then ``error`` says why); None while the request is still running.
    ``logprobs``: per output token, {token id: logprob} of the sampled token and the top ones asked for
    (None unless SamplingParams.logprobs is set). ``prompt_logprobs``: per prompt token, {token id: logprob} of
    it given the tokens before it and the top ones asked for, the first None (SamplingParams.prompt_logprobs;
    in a request's first delta only).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    metrics: RequestMetrics | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merge_delta(total: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Accumulate a step delta into a request's whole output."""
    if total is None:
        return delta
    total.token_ids = total.token_ids + delta.token_ids
    total.text += delta.text
    if delta.logprobs is not None:
        total.logprobs = (total.logprobs or []) + delta.logprobs
    total.finish_reason, total.error, total.metrics = delta.finish_reason, delta.error, delta.metrics
    return total
