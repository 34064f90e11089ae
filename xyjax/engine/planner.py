"""Planner (host, numpy): a ScheduledBatch -> StepInputs + SamplingInputs with bucketed shapes.

Shapes depend only on the token bucket T (the smallest configured bucket >= the step's tokens):
    tokens T; sequences S = min(T, max_num_seqs); sampled rows R = min(T, S * (1 + max_draft_tokens));
    block-table pages P = ceil((max_model_len + max_draft_tokens) / block_size); attention task tables
    from ``tiling.capacities``; banned ids per row ``max_stop_ids``; per sampled row a token bitmask of
    ceil(V / 32) words, ``max_logit_bias`` biases and a history of P * block_size tokens (penalties). The large
    ones (bitmask, biases, history) are one shared empty array per bucket in a step where no row uses them. A row's
    bitmask is the AND of allowed_token_ids, bad words and its request's structured-outputs grammar (after the
    row's drafts).
A prefill chunk of a request that scores its prompt samples every row: a row before the prompt's last scores the
next prompt token (``target``; no processing, its sample unused), the last one samples the first output token.
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
    def __init__(self, config: EngineConfig, max_model_len: int, num_kv_heads: int, vocab_size: int):
        self.config, self.num_kv_heads, self.vocab_size = config, num_kv_heads, vocab_size
        self.pages = -(-(max_model_len + config.max_draft_tokens) // config.block_size)
        self.trees = bool(config.speculative and config.speculative.tree)
        self._empty: dict[int, dict[str, np.ndarray]] = {}   # R -> the large sampling arrays, unused

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
        sampling = SamplingArrays(_sampling_arrays(R, c.max_stop_ids), self._empty_large(R))
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
            k, done = seq.num_samples, len(req.output_ids)
            verify = seq.stage is Stage.VERIFY
            outputs = done + (depth[n - k:] - depth[n - k] if verify else np.zeros(k, np.int32))   # index drawn
            for j in range(k):
                r, index, q = sample_row + j, int(outputs[j]), start + n - k + j
                sample_index[r] = row + n - k + j
                if seq.stage is Stage.PREFILL and q + 1 < len(req.token_ids):   # scores the prompt token after q
                    sampling.score(r, req.token_ids[q + 1])
                    continue
                path = _draft_path(req, trees.get(i), n - k + j) if verify else []
                sampling.fill(r, req, index, path, self.vocab_size)
            sample_row += k
            row += n
        attention = tiling.attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=self.num_kv_heads,
                                              tile=c.prefill_tile, num_tokens=T, lanes=c.attention_lanes,
                                              block_size=bs, max_splits=c.max_kv_splits, min_split_kv=c.min_split_kv,
                                              trees=trees, max_tree=(1 + c.max_draft_tokens) * self.trees)
        inputs = StepInputs(token_ids=tokens, positions=positions, slot_mapping=slots, num_tokens=np.int32(row),
                            attention=attention, sample_index=sample_index, num_samples=np.int32(sample_row))
        return inputs, SamplingInputs(**sampling.arrays)

    def _empty_large(self, rows: int) -> dict[str, np.ndarray]:
        """The large sampling arrays of ``rows`` rows as no row uses them (shared: copied before any write)."""
        if rows not in self._empty:
            words, width = -(-self.vocab_size // 32), self.pages * self.config.block_size
            self._empty[rows] = dict(allowed=np.full((rows, words), -1, np.int32),
                                     bias_ids=np.full((rows, self.config.max_logit_bias), -1, np.int32),
                                     bias=np.zeros((rows, self.config.max_logit_bias), np.float32),
                                     history=np.full((rows, width), -1, np.int32))
            for a in self._empty[rows].values():
                a.flags.writeable = False
        return self._empty[rows]

    def empty(self, bucket: int) -> tuple[StepInputs, SamplingInputs]:
        """An all-padding step of ``bucket`` tokens: running it compiles the bucket and changes nothing."""
        return self.plan(ScheduledBatch([], []), bucket)


def _sampling_arrays(rows: int, banned_width: int) -> dict[str, np.ndarray]:
    """The per-row sampling arrays, fresh, as no row uses them."""
    return dict(temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32), top_p=np.ones(rows, np.float32),
                min_p=np.zeros(rows, np.float32), seed=np.zeros(rows, np.uint32), counter=np.zeros(rows, np.int32),
                banned=np.full((rows, banned_width), -1, np.int32), presence=np.zeros(rows, np.float32),
                frequency=np.zeros(rows, np.float32), repetition=np.ones(rows, np.float32),
                prompt_len=np.zeros(rows, np.int32), logprobs=np.zeros(rows, bool), target=np.full(rows, -1, np.int32))


def _draft_path(req, parents: list[int] | None, j: int) -> list[int]:
    """The drafts a verify run's row j stands on: those from its first draft down to row j (row 0: the pending
    token, none; ``parents``: the run's tree as [-1, parent row of each draft row], None for a chain)."""
    if parents is None:
        return req.draft_token_ids[:j]
    path = []
    while j > 0:
        path.append(req.draft_token_ids[j - 1])
        j = parents[j]
    return path[::-1]


@dataclasses.dataclass
class SamplingArrays:
    """A step's sampling arrays while the planner fills them: the per-row ones, and the large ones (bitmask, biases,
    history), shared empty ones replaced by a fresh copy on their first write."""

    arrays: dict[str, np.ndarray]
    large: dict[str, np.ndarray]

    def __post_init__(self):
        self.arrays.update(self.large)

    def writable(self, name: str) -> np.ndarray:
        if self.arrays[name] is self.large[name]:
            self.arrays[name] = self.large[name].copy()
        return self.arrays[name]

    def score(self, r: int, target: int) -> None:
        """Row r returns the logprob of ``target`` (the next prompt token) and the top ones; its sample is unused."""
        self.arrays["logprobs"][r], self.arrays["target"][r] = True, target

    def fill(self, r: int, req, index: int, path: list[int], vocab_size: int) -> None:
        """Row r samples ``req``'s output token ``index`` after its tokens and the drafts ``path``."""
        p, a = req.params, self.arrays
        a["temperature"][r], a["top_k"][r], a["top_p"][r], a["min_p"][r] = p.temperature, p.top_k, p.top_p, p.min_p
        a["seed"][r], a["counter"][r], a["logprobs"][r] = req.seed, index, p.logprobs is not None
        banned = req.banned_ids(index)
        a["banned"][r, :len(banned)] = banned
        if p.logit_bias:
            self.writable("bias_ids")[r, :len(p.logit_bias)] = list(p.logit_bias)
            self.writable("bias")[r, :len(p.logit_bias)] = list(p.logit_bias.values())
        masked = req.bad_word_tokens(path)
        if p.allowed_token_ids is not None or masked or req.grammar is not None:
            allowed = self.writable("allowed")[r]
            if req.grammar is not None:
                req.grammar.fill(allowed, path)
            if p.allowed_token_ids is not None or masked:
                allowed &= token_bitmask(vocab_size, p.allowed_token_ids, masked)
        if p.penalized:
            a["presence"][r], a["frequency"][r], a["repetition"][r] = (p.presence_penalty, p.frequency_penalty,
                                                                       p.repetition_penalty)
            a["prompt_len"][r] = len(req.prompt_token_ids)
            before = req.token_ids + path
            self.writable("history")[r, :len(before)] = before


def token_bitmask(vocab_size: int, allowed: list[int] | None, masked: list[int]) -> np.ndarray:
    """[ceil(V / 32)] int32: bit t % 32 of word t // 32 set for the tokens of ``allowed`` (None: every token of the
    vocabulary), cleared for ``masked``."""
    bits = np.zeros(-(-vocab_size // 32) * 32, bool)
    if allowed is None:
        bits[:vocab_size] = True
    else:
        bits[np.asarray(allowed, np.int64)] = True
    bits[np.asarray(masked, np.int64)] = False
    return np.packbits(bits.reshape(-1, 32), axis=-1, bitorder="little").view("<u4")[:, 0].view(np.int32)
