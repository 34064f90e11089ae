"""Llama-family model configuration, built from GGUF metadata or an HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a Llama-family decoder (hashable: usable as a jit static arg)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position) or ("linear", factor)
    rope_scaling: tuple | None = None
    architecture: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """From an HF config.json dict (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)."""
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        supported = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
        if arch not in supported:
            raise ValueError(f"unsupported architecture {arch!r} in config.json; supported: {', '.join(supported)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; the Llama family uses 'silu'")
        heads = cfg["num_attention_heads"]
        params = cfg.get("rope_parameters") or {}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rope_theta=float(cfg.get("rope_theta", params.get("rope_theta", 10000.0))),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
            rope_scaling=_rope_scaling(cfg.get("rope_scaling") or (params if "rope_type" in params else None)),
            architecture="qwen2" if arch == "Qwen2ForCausalLM" else "llama",
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], has_output_tensor: bool, has_qkv_bias: bool) -> "ModelConfig":
        """From GGUF metadata (``{arch}.block_count`` etc.)."""
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: llama, qwen2, mistral")

        def get(key, default=None):
            value = meta.get(f"{arch}.{key}", default)
            if value is None:
                raise ValueError(f"GGUF metadata lacks {arch}.{key}")
            return value

        hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
        scaling = None
        if meta.get(f"{arch}.rope.scaling.type") == "linear":
            scaling = ("linear", float(get("rope.scaling.factor")))
        vocab = meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(get("context_length", 2048)),
            tie_word_embeddings=not has_output_tensor,
            attention_bias=has_qkv_bias,
            rope_scaling=scaling,
            architecture="qwen2" if arch == "qwen2" else "llama",
        )

    def to_hf(self) -> dict:
        """An HF config.json dict describing this model."""
        arch = "Qwen2ForCausalLM" if self.architecture == "qwen2" else "LlamaForCausalLM"
        cfg = dict(
            architectures=[arch], model_type=self.architecture, vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, attention_bias=self.attention_bias,
            hidden_act="silu",
        )
        if self.rope_scaling is not None:
            kind, *rest = self.rope_scaling
            cfg["rope_scaling"] = {"rope_type": kind, "factor": rest[0]}
            if kind == "llama3":
                cfg["rope_scaling"].update(low_freq_factor=rest[1], high_freq_factor=rest[2],
                                           original_max_position_embeddings=rest[3])
        return cfg


def _rope_scaling(spec: Mapping[str, Any] | None) -> tuple | None:
    if not spec:
        return None
    kind = spec.get("rope_type", spec.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return ("linear", float(spec["factor"]))
    if kind == "llama3":
        return ("llama3", float(spec["factor"]), float(spec["low_freq_factor"]), float(spec["high_freq_factor"]),
                int(spec["original_max_position_embeddings"]))
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3")
