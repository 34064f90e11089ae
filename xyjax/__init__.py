"""xyjax: serve LLMs from JAX under dynamic workloads (after XY-Serve)."""

from xyjax.llm import LLM
from xyjax.outputs import RequestOutput
from xyjax.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]
