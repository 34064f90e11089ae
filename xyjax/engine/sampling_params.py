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
    temperature/top-k/top-p) plus the N most likely tokens' (vLLM's convention). ``prompt_logprobs``: None, or
    N >= 0 to return each prompt token's logprob given the tokens before it plus the N most likely tokens' (the
    first prompt token's entry is None); ``max_tokens`` 0 (only with prompt_logprobs) scores the prompt and
    generates nothing.
    ``speculative``: False keeps the engine from drafting for this request (its ``speculative`` option).
    Logits processing (vLLM's semantics, applied in this order before temperature): ``logit_bias`` {token id:
    bias in [-100, 100]} added; ``allowed_token_ids`` the only tokens that may be sampled; ``bad_words`` (strings)
    never generated (the last token of a word is masked where the output ends with the rest of it);
    ``repetition_penalty`` (> 0, 1 off) divides positive and multiplies negative logits of every token in the
    prompt or output; ``frequency_penalty`` and ``presence_penalty`` (in [-2, 2]) subtract per occurrence / once
    for every token in the output. ``min_p`` (in [0, 1]) drops tokens less likely than min_p times the top one.
    ``structured_outputs``: a StructuredOutputs (or a dict of its fields): the output follows that grammar and ends
    when it is complete.
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
    prompt_logprobs: int | None = None
    speculative: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputs | dict | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias is not None and isinstance(self.logit_bias, dict):   # JSON keys are strings
            self.logit_bias = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v
                               for k, v in self.logit_bias.items()}
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputs.from_dict(self.structured_outputs)
        checks = [
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= (self.prompt_logprobs is None),
             "an integer >= 1 (0 only with prompt_logprobs)"),
            ("temperature", _is_num(self.temperature) and 0 <= self.temperature < float("inf"), "a finite number >= 0"),
            ("top_k", _is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 or -1: disabled)"),
            ("top_p", _is_num(self.top_p) and 0 < self.top_p <= 1, "a number in (0, 1]"),
            ("seed", self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**32), "None or in [0, 2**32)"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "non-negative integers"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
            ("logprobs", self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             "None or an integer >= 0"),
            ("prompt_logprobs", self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                                and self.prompt_logprobs >= 0),
             "None or an integer >= 0"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             f"an integer in [0, max_tokens={self.max_tokens}]"),
            ("presence_penalty", _is_num(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", _is_num(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "in [-2, 2]"),
            ("repetition_penalty", _is_num(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
             "a finite number > 0"),
            ("min_p", _is_num(self.min_p) and 0 <= self.min_p <= 1, "in [0, 1]"),
            ("logit_bias", self.logit_bias is None or (isinstance(self.logit_bias, dict) and all(
                _is_int(k) and k >= 0 and _is_num(v) and -100 <= v <= 100 for k, v in self.logit_bias.items())),
             "None or a map of token ids >= 0 to biases in [-100, 100]"),
            ("allowed_token_ids", self.allowed_token_ids is None or (
                isinstance(self.allowed_token_ids, (list, tuple)) and len(self.allowed_token_ids) > 0
                and all(_is_int(t) and t >= 0 for t in self.allowed_token_ids)),
             "None or a non-empty list of token ids >= 0"),
            ("bad_words", self.bad_words is None or (isinstance(self.bad_words, (list, tuple)) and all(
                isinstance(w, str) and w for w in self.bad_words)), "None or a list of non-empty strings"),
            ("structured_outputs", self.structured_outputs is None or isinstance(self.structured_outputs,
                                                                                 StructuredOutputs),
             "None, a StructuredOutputs or a dict of its fields"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{field} must be {expected}, got {getattr(self, field)!r}")

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the sampler then needs the request's tokens)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclasses.dataclass
class StructuredOutputs:
    """The grammar a request's output follows (vLLM's ``structured_outputs``), exactly one of: ``json`` a JSON
    schema (a dict), or "object" for any JSON object; ``regex`` a regular expression (Rust regex syntax) the whole
    output matches; ``choice`` a list of strings, one of which is the output; ``grammar`` a Lark grammar
    (llguidance's dialect). Only the shape is checked here; the engine compiles the grammar when the request is
    added and refuses it there, naming the problem."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self):
        given = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]
        if len(given) != 1:
            raise ValueError(f"SamplingParams.structured_outputs must set exactly one of json, regex, choice or "
                             f"grammar, got {', '.join(given) or 'none'}")
        checks = {"json": (isinstance(self.json, dict) or self.json == "object", 'a JSON schema (dict) or "object"'),
                  "regex": (isinstance(self.regex, str) and self.regex != "", "a non-empty string"),
                  "choice": (isinstance(self.choice, (list, tuple)) and len(self.choice) > 0
                             and all(isinstance(c, str) and c for c in self.choice),
                             "a non-empty list of non-empty strings"),
                  "grammar": (isinstance(self.grammar, str) and self.grammar.strip() != "", "a non-empty string")}
        ok, expected = checks[given[0]]
        if not ok:
            raise ValueError(f"SamplingParams.structured_outputs.{given[0]} must be {expected}, "
                             f"got {getattr(self, given[0])!r}")

    @classmethod
    def from_dict(cls, fields: dict) -> StructuredOutputs:
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"SamplingParams.structured_outputs has unknown fields {unknown} "
                             f"(known: json, regex, choice, grammar)")
        return cls(**fields)

    @property
    def kind(self) -> str:
        """The field that is set."""
        return next(f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x
