"""Host-side state of one request."""

from __future__ import annotations

import dataclasses
import enum

from xyjax.engine.drafters import DraftTree
from xyjax.engine.outputs import RequestMetrics
from xyjax.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    """waiting -> running -> finished (finish_reason: stop, length, abort or error); preemption: running -> waiting."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)   # identity: requests are compared and hashed as objects
class Request:
    """``token_ids`` = prompt + output; the KV of the first ``num_computed`` of them is in ``block_table``.
    ``draft_token_ids``: speculative tokens to verify after ``token_ids`` in the next step (V stage), a chain,
    or with ``draft_parents`` (xyjax.engine.drafters.DraftTree.parents) a token tree. ``spec``: its adaptive drafting
    control (xyjax.engine.speculative.AdaptiveControl) when the engine speculates. ``grammar``: its structured
    outputs matcher (xyjax.engine.structured.Grammar) or None; only ``append`` advances it. ``prompt_logprobs``:
    with SamplingParams.prompt_logprobs, the entries of the prompt tokens scored so far (the first: None)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: int                                     # admission order (FCFS; preemption picks the largest)
    metrics: RequestMetrics
    stop_ids: frozenset[int] = frozenset()           # token ids that end it (stop_token_ids, EOS)
    bad_word_ids: list[list[int]] = dataclasses.field(default_factory=list)   # params.bad_words as token ids
    grammar: object = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    draft_token_ids: list[int] = dataclasses.field(default_factory=list)
    draft_parents: list[int] | None = None
    spec: object = None
    block_table: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    prompt_logprobs: list[dict[int, float] | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    detokenizer: object = None
    sent_tokens: int = 0                             # output tokens / text already handed out as deltas
    sent_text: int = 0

    def __post_init__(self):
        self.token_ids = list(self.prompt_token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is still to be computed, drafts excluded (the prompt at first, then 1 per decode)."""
        return len(self.token_ids) - self.num_computed

    @property
    def scores_prompt(self) -> bool:
        """Whether prompt tokens are still to be scored: its prefill chunks sample every row, and it takes no
        prefix-cache hit (that would skip rows to score)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def banned_ids(self, output_index: int) -> list[int]:
        """Token ids masked when sampling output token ``output_index``: the stop ids until min_tokens exist."""
        return sorted(self.stop_ids) if output_index < self.params.min_tokens else []

    def bad_word_tokens(self, drafts: list[int]) -> list[int]:
        """The last token of each bad word whose other tokens end the output (then ``drafts``): never sampled next."""
        if not self.bad_word_ids:
            return []
        out = self.output_ids + drafts
        return [w[-1] for w in self.bad_word_ids
                if len(w) == 1 or (len(out) >= len(w) - 1 and out[len(out) - len(w) + 1:] == w[:-1])]

    def append(self, token: int, max_model_len: int) -> str | None:
        """Append a sampled token and its text; returns the finish reason it brings: "stop" (a stop id, a stop
        string ending in the new text, which is cut there, or the grammar complete), "length" (max_tokens or
        ``max_model_len`` reached), "error" (the grammar refuses the token, which is not appended) or None."""
        if self.grammar is not None and not self.grammar.consume(token):
            return "error"
        self.token_ids.append(token)
        self.metrics.num_output_tokens += 1
        delta = self.detokenizer.add(token)
        self.text += delta
        p, n = self.params, len(self.token_ids) - len(self.prompt_token_ids)
        if n >= p.min_tokens and token in self.stop_ids:
            self.text += self.detokenizer.flush()
            return "stop"
        if n >= p.min_tokens:
            for s in p.stop:  # only a match ending inside the new delta is new
                at = self.text.find(s, max(0, len(self.text) - len(delta) - len(s) + 1))
                if at >= 0:
                    self.text = self.text[:at]
                    return "stop"
        if self.grammar is not None and self.grammar.complete:
            self.text += self.detokenizer.flush()
            return "stop"
        if n >= p.max_tokens or len(self.token_ids) >= max_model_len:
            self.text += self.detokenizer.flush()
            return "length"
        return None

    def draft_tree(self) -> DraftTree:
        """The drafts to verify as a DraftTree (a chain when ``draft_parents`` is None)."""
        if self.draft_parents is None:
            return DraftTree.chain(self.draft_token_ids)
        return DraftTree(self.draft_token_ids, self.draft_parents)

    def set_draft(self, tree: DraftTree) -> None:
        """Verify ``tree`` in the next step (an empty tree: plain decoding)."""
        self.draft_token_ids, self.draft_parents = tree.tokens, None if tree.is_chain else tree.parents

    def clear_draft(self) -> None:
        self.draft_token_ids, self.draft_parents = [], None
