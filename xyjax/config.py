"""EngineConfig: the engine options ``LLM(model, **engine_options)`` accepts."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class EngineConfig:
    """Engine options.

    block_size: tokens per KV block. kv_cache_memory: bytes for the KV block pool (sets num_blocks).
    max_model_len: context length (prompt + output); None: the model's own. max_num_seqs: sequences
    running at once. max_num_batched_tokens: prefill tokens per step (longer prompts are chunked).
    attention_backend / gemm_backend: op backends. seed: seeds requests that bring none.
    """

    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    attention_backend: str = "xla"
    gemm_backend: str = "xla"
    seed: int = 0

    def __post_init__(self):
        for name in ("block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"engine option {name} must be a positive integer, got {value!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise ValueError(f"engine option max_model_len must be a positive integer, got {self.max_model_len!r}")

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
