"""Planner (host, numpy): a ScheduledBatch -> StepInputs + SamplingInputs with bucketed shapes.

Shapes depend only on the token bucket T (the smallest configured bucket >= the step's tokens):
    tokens T; sequences S = min(T, max_num_seqs); sampled rows R = min(T, S * (1 + max_draft_tokens));
    block-table pages P = ceil((max_model_len + max_draft_tokens) / block_size); attention task tables
    from ``tiling.capacities``; banned ids per row ``max_stop_ids``.
When the engine drafts token trees, every bucket also carries the tree mask [T, 1 + max_draft_tokens].
So the jitted step has one program per bucket. Real sizes (num_tokens, num_tasks, num_samples) are data;
padding tokens have slot -1 (write no KV) and no task covers them (zero attention output). A verify run
of a tree puts row j at position start + depth(j), its KV at slot position start + j, and samples it with
the counter of output index ``done + depth(j)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from xyjax.ops.attention import tiling
from xyjax.engine.config import EngineConfig
from xyjax.ops.sampler import SamplingInputs
from xyjax.engine.batch import ScheduledBatch, Stage
from xyjax.ops.step_inputs import StepInputs


@dataclasses.dataclass(frozen=True)
class Shapes:
    tokens: int
    seqs: int
    samples: int


class Planner:
    def __init__(self, config: EngineConfig, max_model_len: int, num_kv_heads: int):
        self.config, self.num_kv_heads = config, num_kv_heads
        self.pages = -(-(max_model_len + config.max_draft_tokens) // config.block_size)
        self.trees = bool(config.speculative and config.speculative.tree)

    def shapes(self, num_tokens: int) -> Shapes:
        """The bucket for a step of ``num_tokens`` real tokens."""
        c = self.config
        tokens = next((b for b in c.token_buckets if b >= num_tokens), None)
        if tokens is None:
            raise ValueError(f"a step of {num_tokens} tokens exceeds the largest bucket {c.token_buckets[-1]}")
        seqs = min(tokens, c.max_num_seqs)
        return Shapes(tokens, seqs, min(tokens, seqs * (1 + c.max_draft_tokens)))

    def plan(self, batch: ScheduledBatch, bucket: int | None = None) -> tuple[StepInputs, SamplingInputs]:
        """Arrays for one step; each sequence samples ``num_samples`` rows, masking ``Request.banned_ids``.
        ``bucket``: force a (larger) bucket."""
        c, bs = self.config, self.config.block_size
        shape = self.shapes(max(batch.num_tokens, bucket or 0))
        T, S, R = shape.tokens, shape.seqs, shape.samples
        tokens, positions, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.full(T, -1, np.int32)
        q_start, q_len, kv_len = np.zeros(S, np.int32), np.zeros(S, np.int32), np.zeros(S, np.int32)
        tables = np.zeros((S, self.pages), np.int32)
        sample_index = np.zeros(R, np.int32)
        sampling = _sampling_arrays(R, c.max_stop_ids)
        row = sample_row = 0
        trees = {}
        for i, seq in enumerate(batch.seqs):
            req, n = seq.request, seq.num_tokens
            start = req.num_computed
            ids = req.token_ids + req.draft_token_ids if seq.stage is Stage.VERIFY else req.token_ids
            depth = np.arange(n)
            if seq.stage is Stage.VERIFY and req.draft_parents is not None:
                trees[i] = [-1] + [p + 1 for p in req.draft_parents]
                depth = np.asarray([0] + req.draft_tree().depths())
            pos = np.arange(start, start + n)
            table = np.asarray(req.block_table, np.int32)
            tokens[row:row + n] = ids[start:start + n]
            positions[row:row + n] = start + depth
            slots[row:row + n] = table[pos // bs] * bs + pos % bs
            q_start[i], q_len[i], kv_len[i] = row, n, start + n
            tables[i, :len(table)] = table
            k = seq.num_samples
            p, done = req.params, len(req.output_ids)
            outputs = done + depth[n - k:] - (depth[n - k] if k else 0)     # output index each sampled row draws
            for j in range(k):
                r, index = sample_row + j, int(outputs[j])
                sample_index[r] = row + n - k + j
                sampling.temperature[r], sampling.top_k[r], sampling.top_p[r] = p.temperature, p.top_k, p.top_p
                sampling.seed[r], sampling.counter[r] = req.seed, index
                sampling.logprobs[r] = p.logprobs is not None
                banned = req.banned_ids(index)
                sampling.banned[r, :len(banned)] = banned
            sample_row += k
            row += n
        attention = tiling.attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=self.num_kv_heads,
                                              tile=c.prefill_tile, num_tokens=T, lanes=c.attention_lanes,
                                              block_size=bs, max_splits=c.max_kv_splits, min_split_kv=c.min_split_kv,
                                              trees=trees, max_tree=(1 + c.max_draft_tokens) * self.trees)
        inputs = StepInputs(token_ids=tokens, positions=positions, slot_mapping=slots, num_tokens=np.int32(row),
                            attention=attention, sample_index=sample_index, num_samples=np.int32(sample_row))
        return inputs, sampling

    def empty(self, bucket: int) -> tuple[StepInputs, SamplingInputs]:
        """An all-padding step of ``bucket`` tokens: running it compiles the bucket and changes nothing."""
        return self.plan(ScheduledBatch([], []), bucket)


def _sampling_arrays(rows: int, banned_width: int) -> SamplingInputs:
    return SamplingInputs(temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
                          top_p=np.ones(rows, np.float32), seed=np.zeros(rows, np.uint32),
                          counter=np.zeros(rows, np.int32), banned=np.full((rows, banned_width), -1, np.int32),
                          logprobs=np.zeros(rows, bool))
