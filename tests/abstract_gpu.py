"""Lowering for CUDA on a host without a GPU: the Pallas Triton lowering asks the device for its compute
capability (jax >= 0.12), which a CPU host answers only through an abstract GPU device on the abstract mesh."""

import contextlib

import jax

# The GPU the CUDA lowerings target (compute capability 9.0).
DEVICE_KIND = "NVIDIA H100"


def abstract_cuda_device(device_kind: str = DEVICE_KIND):
    """A context in which lowering for CUDA targets ``device_kind`` (jax.sharding.AbstractDevice on a one-device
    abstract mesh); on a jax without AbstractDevice, the lowering needs no device and this does nothing."""
    sharding = jax.sharding
    if not hasattr(sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    return sharding.use_abstract_mesh(sharding.AbstractMesh((1,), ("x",), abstract_device=device))
