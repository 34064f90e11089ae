"""EngineConfig: the engine options ``LLM(model, **engine_options)`` accepts."""

from __future__ import annotations

import dataclasses
import os

import jax

from ascend_ffi import blas
from xyjax.engine.speculative import SpecConfig
from xyjax.ops import attention, gemm
from xyjax.ops.gemm import formats, quant
from xyjax.ops.paths import cache_dir


def default_compilation_cache_dir() -> str:
    return cache_dir("jax-compilation-cache")


@dataclasses.dataclass
class EngineConfig:
    """Engine options.

    block_size: tokens per KV block. kv_cache_memory: bytes for the KV block pool (sets num_blocks).
    max_model_len: context length (prompt + output); None: the model's own (capped by the pool).
    max_num_seqs: requests running at once.
    max_num_batched_tokens: the token budget of one step (decode, verify and prefill tokens together;
        longer prompts are chunked). 512 was measured best on a 2-core CPU (BENCHMARKS.md).
    token_buckets: the step shapes (token counts) compiled at start; None: powers of two from 16 up to
        the budget, plus the budget itself.
    prefill_tile: query tokens per attention task of prefill chunks and verify runs (decodes use 1); 32 was
        measured fastest with the ffi kernel (BENCHMARKS.md), by a few percent.
    attention_lanes: workers the attention tasks are balanced over (None: the CPU count, or
        $XYJAX_ATTENTION_THREADS). max_kv_splits: KV splits a straggler task may be cut into (1: never);
        min_split_kv: the fewest KV positions of a split (xyjax.ops.attention.tiling).
    max_draft_tokens: speculative tokens a request may verify per step (sets the sampled-row capacity).
    speculative: None (off) or a dict of ``xyjax.engine.speculative.SpecConfig`` fields, e.g. {"method": "ngram",
        "num_draft_tokens": 4, "tree": False}: the engine drafts for decoding requests and verifies the drafts
        in the V stage; max_draft_tokens is raised to num_draft_tokens. Parsed into a SpecConfig.
    max_logprobs: the most top logprobs a request may ask for (SamplingParams.logprobs, prompt_logprobs).
    max_stop_ids: the most token ids one request may mask before min_tokens (its stop ids and EOS).
    max_logit_bias: the most entries of one request's logit_bias.
    compilation_cache_dir: JAX's persistent compilation cache ("" disables it; unused in a jax.distributed job); default
        $XYJAX_CACHE_DIR/jax-compilation-cache. It is process-wide (a jax config).
    precompile: compile every bucket at start (with a progress bar).
    attention_backend: "ffi" (C++ custom call, the default on CPU; CPU only: refused elsewhere), "xla" (pure jnp,
        the default elsewhere) or "pallas" (Pallas kernels: Mosaic GPU on Hopper, Triton on other GPUs, interpret
        mode on CPU, for tests; ``xyjax.ops.pallas_lowering``).
    gemm_backend: "ffi" (C++ custom call over MKL, the default on CPU where MKL is installed; CPU only), "xla"
        (pure jnp, the default elsewhere) or "pallas" (as attention_backend's). The
        engine reads the backend's tunables from this device's `xyjax profile` table when there is one.
    weight_layout: how the gemm backend holds a GGUF's block-quantized weights (``GGUFBlocks``,
        ``xyjax.ops.gemm.prepare_weights``): "auto" (the backend's choice: "blocks" for ffi, plain for xla and
        pallas), "plain" (dense float32), "split" (Q4_1 as ``SplitBlocks``, other types plain), "tiles"
        (``TileWeights``, ffi on AMX CPUs) or "blocks" (the file's blocks, kept as ``GGUFBlocks``: the ffi block
        kernels read them in place; xla and pallas compute on their dense view).
    activation_quant: "none" (the default: exact float32 activations) or "int8" (the dense layers' inputs
        quantized per token and per group of 32 inputs to int8, multiplied as integers with the weight blocks:
        ``xyjax.ops.gemm.quant``; faster where compute bounds, a different numerical contract: ``xyjax
        eval-quant`` measures it). Needs the weights as GGUF blocks ("auto" then means "blocks" on every
        backend); the embedding, the LM head and attention stay float32.
    enable_prefix_caching: token-wise automatic prefix caching (xyjax.engine.prefix_cache): a request reuses the KV of
        the longest prefix of its tokens that an earlier request computed, down to the token.
    seed: seeds requests that bring none.
    tensor_parallel_size: devices one engine's step runs on (``xyjax.engine.parallel``): heads, the MLP and the
        vocabulary cut over a mesh axis, the KV cache by KV head (kv_cache_memory is the pool over all of them).
        The model's heads, KV heads, intermediate size and vocabulary must divide by it; weights are plain or
        GGUF blocks (layout "plain" or "blocks"; row-parallel blocks need K / n a multiple of the block).
    """

    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    token_buckets: tuple[int, ...] | None = None
    prefill_tile: int = 32
    attention_lanes: int | None = None
    max_kv_splits: int = 4
    min_split_kv: int = 256
    max_draft_tokens: int = 0
    speculative: dict | None = None
    max_logprobs: int = 20
    max_stop_ids: int = 16
    max_logit_bias: int = 300
    compilation_cache_dir: str | None = dataclasses.field(default_factory=default_compilation_cache_dir)
    precompile: bool = True
    attention_backend: str | None = None
    gemm_backend: str | None = None
    weight_layout: str = "auto"
    activation_quant: str = "none"
    enable_prefix_caching: bool = True
    seed: int = 0
    tensor_parallel_size: int = 1

    def __post_init__(self):
        if self.attention_lanes is None:
            self.attention_lanes = int(os.environ.get("XYJAX_ATTENTION_THREADS") or os.cpu_count() or 1)
        positive = ("block_size", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens", "prefill_tile",
                    "max_logprobs", "max_stop_ids", "max_logit_bias", "attention_lanes", "max_kv_splits", "min_split_kv",
                    "tensor_parallel_size")
        for name in positive + ("max_model_len", "max_draft_tokens"):
            value = getattr(self, name)
            if name == "max_model_len" and value is None:
                continue
            low = 0 if name == "max_draft_tokens" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"engine option {name} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"engine option enable_prefix_caching must be True or False, "
                             f"got {self.enable_prefix_caching!r}")
        platform = jax.default_backend()
        cpu = platform == "cpu"
        if self.attention_backend is None:
            self.attention_backend = "ffi" if cpu else "xla"
        if self.gemm_backend is None:   # ffi needs MKL (a dependency on x86-64 Linux only)
            self.gemm_backend = "ffi" if cpu and blas.available() else "xla"
        if not cpu:
            self._refuse_cpu_only(platform)
        for name, backends in (("attention_backend", attention.BACKENDS), ("gemm_backend", gemm.BACKENDS),
                               ("weight_layout", formats.LAYOUTS)):
            if getattr(self, name) not in backends:
                raise ValueError(f"engine option {name} must be one of {', '.join(backends)}, "
                                 f"got {getattr(self, name)!r}")
        quant.check_mode(self.activation_quant)
        if self.activation_quant != "none" and self.weight_layout not in ("auto", "blocks"):
            raise ValueError(f"engine option activation_quant={self.activation_quant!r} needs weight_layout 'blocks' "
                             f"(or 'auto'), got {self.weight_layout!r}")
        if not isinstance(self.speculative, SpecConfig):
            self.speculative = SpecConfig.parse(self.speculative)
        if self.speculative:
            self.max_draft_tokens = max(self.max_draft_tokens, self.speculative.num_draft_tokens)
        budget = self.max_num_batched_tokens
        if self.token_buckets is None:
            self.token_buckets = tuple(sorted({min(16, budget)} | {1 << i for i in range(4, budget.bit_length())
                                                                    if 1 << i <= budget} | {budget}))
        buckets = self.token_buckets = tuple(sorted(set(self.token_buckets)))
        if not buckets or any(not isinstance(b, int) or b < 1 for b in buckets) or buckets[-1] != budget:
            raise ValueError(f"engine option token_buckets must be positive integers whose largest is the token "
                             f"budget max_num_batched_tokens={budget}, got {self.token_buckets!r}")
        per_seq = 1 + self.max_draft_tokens
        if self.max_num_seqs * per_seq > budget:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} requests x {per_seq} decode/verify tokens exceed the "
                             f"token budget max_num_batched_tokens={budget}; every running request must fit a step")

    def _refuse_cpu_only(self, platform: str) -> None:
        """The ffi backends are C++ CPU custom calls (``ascend_ffi``; the gemm's BLAS is MKL): on another platform
        XLA would fail at compile with no word of the option; refuse them here, naming it."""
        cpu_only = [f"{name}='ffi'" for name in ("attention_backend", "gemm_backend") if getattr(self, name) == "ffi"]
        if cpu_only:
            raise ValueError(f"engine option {' and '.join(cpu_only)}: the ffi backends are C++ CPU kernels (ascend_ffi, "
                             f"MKL) and jax's default backend here is {platform!r}; use 'pallas' or 'xla'")

    @classmethod
    def from_options(cls, options: dict) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**options)
