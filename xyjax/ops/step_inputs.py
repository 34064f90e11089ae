"""StepInputs: everything one engine step feeds the model, with bucketed shapes and real sizes as data."""

from __future__ import annotations

import jax
from flax import struct

from xyjax.ops.attention import AttentionMetadata


@struct.dataclass
class StepInputs:
    """One step's tokens, padded to a token bucket T; sampled rows padded to R.

    token_ids:    [T] int32 (padding: 0)
    positions:    [T] int32 absolute position of each token in its sequence
    slot_mapping: [T] int32 flat KV slot (block * block_size + offset); -1 writes nothing
    num_tokens:   [] int32 real tokens (rows >= num_tokens are padding)
    attention:    AttentionMetadata: block tables [S, P] and attention task tables (xyjax.ops.attention.tiling)
    sample_index: [R] int32 rows of the token array whose logits are wanted
    num_samples:  [] int32 real entries of sample_index
    """

    token_ids: jax.Array
    positions: jax.Array
    slot_mapping: jax.Array
    num_tokens: jax.Array
    attention: AttentionMetadata
    sample_index: jax.Array
    num_samples: jax.Array
