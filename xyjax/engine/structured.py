"""Structured outputs with llguidance: a request's StructuredOutputs compiled to a grammar, matched token by token.

llguidance (Rust, no Python dependencies) rather than xgrammar, whose wheel needs torch, transformers and triton.
The engine builds one ``LLTokenizer`` (``grammar_tokenizer``) the first time a request asks for structured outputs;
each such request owns a ``Grammar`` (an ``LLMatcher``), created when it is added, which holds the grammar's state
after the request's output. The planner writes each sampled row's token bitmask from it (a verify row: after
that row's drafts, consumed and rolled back); ``Request.append`` (in postprocess) advances it by each accepted
token. Preemption leaves it alone: the output, and so the state, does not change when the KV is recomputed.
"""

from __future__ import annotations

import json

import llguidance
import numpy as np

from models.tokenizer import Tokenizer
from xyjax.engine.sampling_params import StructuredOutputs

# JSON without free whitespace (compact, and a small model cannot loop on blanks); separators "," and ":".
JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (its HF ``tokenizers`` backend) over the model's ``vocab_size`` token ids;
    every stop token of the tokenizer is an EOS the grammar allows where it is complete."""
    return llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                  eos_token=sorted(tokenizer.stop_token_ids))


def grammar_text(spec: StructuredOutputs) -> str:
    """``spec`` as an llguidance grammar (not yet checked: the matcher is)."""
    if spec.json is not None:
        schema = {"type": "object"} if spec.json == "object" else spec.json
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.regex is not None:
        return llguidance.LLMatcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec.choice))
    return llguidance.LLMatcher.grammar_from_lark(spec.grammar)


class Grammar:
    """One request's matcher: its state is the grammar after the request's output."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, spec: StructuredOutputs):
        """Raises ValueError naming the field and the problem if the grammar is invalid."""
        self.matcher = llguidance.LLMatcher(tokenizer, grammar_text(spec), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"structured_outputs.{spec.kind}: {self.matcher.get_error()}")

    def fill(self, row: np.ndarray, drafts: list[int]) -> None:
        """Write the tokens allowed after the output and then ``drafts`` into ``row`` (a contiguous [ceil(V / 32)]
        int32 bitmask). Drafts the grammar refuses are not followed: a row after one is never accepted."""
        n = self.matcher.try_consume_tokens(drafts) if drafts else 0
        self.matcher.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        if n:
            self.matcher.rollback(n)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar accepts after the output."""
        return self.matcher.validate_tokens(tokens)

    def consume(self, token: int) -> bool:
        """Advance by an accepted output token; False (the matcher then stays in error) if the grammar refuses it."""
        return self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """Whether the output is a full match that nothing may extend."""
        return self.matcher.is_stopped() and not self.matcher.is_error()
