"""xyjax: serve LLMs from JAX under dynamic workloads (after XY-Serve).

The public names load lazily, so ``models`` can import ``xyjax.ops`` without pulling in the engine.
"""

import importlib

_PUBLIC = {"LLM": "xyjax.llm", "RequestOutput": "xyjax.engine.outputs", "SamplingParams": "xyjax.engine.sampling_params",
           "StructuredOutputs": "xyjax.engine.sampling_params"}
__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'xyjax' has no attribute {name!r}")
