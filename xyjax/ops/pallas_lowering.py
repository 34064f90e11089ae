"""Which Pallas lowering the ``pallas`` backends of meta_attention and smooth_gemm use on this device.

    "mosaic"            Pallas' Mosaic GPU lowering (``plgpu.kernel``: TMA copies, wgmma): the one JAX develops
                        for Hopper (its Triton-lowered GPU ops are gone from jax 0.12). bfloat16 / float16 only.
    "triton"            Pallas' Triton lowering (``pl.pallas_call`` with Triton compiler params): every GPU,
                        every dtype (float32 dots in IEEE float32 by default).
    "interpret"         the Triton-style kernel in Pallas' interpreter (CPU).
    "mosaic_interpret"  the Mosaic GPU kernel in Pallas' GPU interpreter (CPU; simulates shared memory, TMA and
                        barriers; slow: tests and ``examples/gpu_check.py --dry-run``).

``default_lowering()``: $XYJAX_PALLAS_LOWERING when set, else "interpret" on CPU, "mosaic" on a GPU of compute
capability 9.x (Hopper: H100, H200), "triton" on any other GPU. Each op falls back from the Mosaic kernel to the
Triton-style one (same device kind: GPU or interpreter) for what the Mosaic kernel does not take (float32, shapes
that are not multiples of its tiles, tree masks); ``<op>.pallas_mosaic.unsupported`` names the reason.
"""

from __future__ import annotations

import os

import jax

LOWERINGS = ("mosaic", "triton", "interpret", "mosaic_interpret")
ENV = "XYJAX_PALLAS_LOWERING"
HOPPER = ("H100", "H200", "H800", "H20", "GH200")   # device kinds of compute capability 9.0


def is_hopper(device) -> bool:
    """Whether ``device`` is an NVIDIA GPU of compute capability 9.x (its ``compute_capability``, else its kind)."""
    capability = getattr(device, "compute_capability", None)
    if capability is not None:
        return str(capability).split(".")[0] == "9"
    return device.platform == "gpu" and any(kind in device.device_kind for kind in HOPPER)


def default_lowering() -> str:
    """The lowering of this process's default device (module docstring)."""
    forced = os.environ.get(ENV)
    if forced:
        return check(forced)
    if jax.default_backend() == "cpu":
        return "interpret"
    return "mosaic" if is_hopper(jax.devices()[0]) else "triton"


def check(lowering: str) -> str:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown Pallas lowering {lowering!r} (from {ENV} or an argument); "
                         f"known: {', '.join(LOWERINGS)}")
    return lowering


def fallback(lowering: str) -> str:
    """The Triton-style lowering on the same kind of device as ``lowering``."""
    return {"mosaic": "triton", "mosaic_interpret": "interpret"}.get(lowering, lowering)
