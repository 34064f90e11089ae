"""Tensor parallelism over a ``jax.sharding.Mesh`` with one axis ``tp``: the model's params cut as
``models.llama.tp_plan`` says, the KV cache cut by KV head, and the step's forward pass run per shard under
``shard_map`` (so the ffi and pallas kernels see one shard's weights and KV heads, and the attention task tables,
planned for ``num_kv_heads / n`` heads, describe one shard).

Every param leaf is held as one global array ``[n, ...]`` sharded on its first axis: shard s's piece of a cut
param, or a copy of a replicated one (norms; each device holds its own copy, as replication would). A weight
format keeps its class per shard (a ``GGUFBlocks`` cut along K has k = K / n), so shard_map's body rebuilds the
shard's pytree from its leaves with the local structure. Arrays are built with ``jax.make_array_from_callback``:
each process (``jax.distributed``) places only its own devices' pieces.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import ModelConfig
from models.llama import forward, local_config, tp_plan
from xyjax.ops import Backends
from xyjax.ops.gemm.formats import split_inputs, split_outputs
from xyjax.ops.kv_cache import KVCache

TP = "tp"
KV_SPEC = P(None, None, TP)   # KVCache k, v [L, num_blocks, num_kv_heads, block_size, head_dim] by KV head


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A mesh of the first ``tensor_parallel_size`` of ``devices`` (default ``jax.devices()``, every process's);
    a ValueError when there are fewer."""
    devices = list(jax.devices() if devices is None else devices)
    if tensor_parallel_size > len(devices):
        hint = (" (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)"
                if devices and devices[0].platform == "cpu" else "")
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} needs {tensor_parallel_size} devices, "
                         f"{len(devices)} available ({devices[0].platform if devices else 'none'}){hint}")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP,))


def _cut(kind, w, n: int) -> list:
    """``w`` (host) as n shards per ``tp_plan`` entry ``kind`` (None: n references to w, replicated)."""
    if kind is None:
        return [w] * n
    if kind == "vocab":
        return split_outputs(w, n)
    if kind == "inputs":
        return split_inputs(w, n)
    what, sections = kind
    if what == "bias":
        return [b[..., 0] for b in split_outputs(np.asarray(w)[..., None], n, sections)]
    return split_outputs(w, n, sections)


def _host(w):
    return jax.tree.map(np.asarray, w)


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    """The params on a mesh: ``leaves`` (global arrays [n, ...] sharded on axis 0) and ``treedef`` (one shard's
    param pytree structure); ``kv_sharding`` places the KV cache."""

    mesh: Mesh
    cfg: ModelConfig
    leaves: list
    treedef: jax.tree_util.PyTreeDef

    @property
    def kv_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, KV_SPEC)

    def create_kv(self, num_blocks: int, block_size: int, dtype) -> KVCache:
        """The zeroed KV cache, each device holding its KV heads of every block."""
        cfg = self.cfg
        create = functools.partial(KVCache.create, cfg.num_layers, num_blocks, block_size, cfg.num_kv_heads,
                                   cfg.head_dim, dtype)
        return jax.jit(create, out_shardings=self.kv_sharding)()

    def forward(self, backends: Backends):
        """``fn(leaves, kv, inputs) -> (logits [R, V] float32, kv)``: ``models.llama.forward`` per shard under
        shard_map (inputs replicated; one psum after O and after down, one after the embedding lookup, the
        logits gathered)."""
        n = self.mesh.shape[TP]
        cfg = local_config(self.cfg, n)

        def body(leaves, kv, inputs):
            params = jax.tree.unflatten(self.treedef, [leaf[0] for leaf in leaves])
            return forward(params, kv, inputs, cfg=cfg, backends=backends, tp_axis=TP)

        specs = [P(TP)] * len(self.leaves)
        # check_vma off: the custom calls (ffi kernels) carry no varying-axes rule; the specs say it all.
        return jax.shard_map(body, mesh=self.mesh, in_specs=(specs, KV_SPEC, P()), out_specs=(P(), KV_SPEC),
                             check_vma=False)


def shard_model(params: dict, cfg: ModelConfig, mesh: Mesh) -> ShardedModel:
    """``params`` (as the engine holds them: plain or ``GGUFBlocks`` weights) cut over ``mesh``'s ``tp`` axis and
    placed; ValueErrors name a shape that does not divide or a format that cannot be cut."""
    n = mesh.shape[TP]
    local_config(cfg, n)                                   # heads, MLP and vocabulary divide
    plan = tp_plan(cfg)
    layers = {name: _cut(plan.get(name), _host(w), n) for name, w in params["layers"].items()}
    top = {name: _cut(plan.get(name), _host(w), n) for name, w in params.items() if name != "layers"}
    shards = [dict({name: cut[s] for name, cut in top.items()}, layers={name: cut[s] for name, cut in layers.items()})
              for s in range(n)]
    per_shard = [jax.tree.leaves(shard) for shard in shards]
    sharding = NamedSharding(mesh, P(TP))
    leaves = []
    for i, first in enumerate(per_shard[0]):
        pieces = [np.asarray(leaves_s[i]) for leaves_s in per_shard]
        leaves.append(jax.make_array_from_callback((n, *first.shape), sharding,
                                                   lambda index, pieces=pieces: pieces[index[0].start or 0][None]))
    return ShardedModel(mesh, cfg, leaves, jax.tree.structure(shards[0]))
