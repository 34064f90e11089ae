"""Applying a step's results to its requests: the one place request state changes after a step runs.

Owned by the scheduler (``Scheduler.postprocess`` calls ``apply``). First every scheduled request's
``num_computed`` advances by the tokens it ran, computed prefill tokens go to the prefix cache and a prompt-scoring
chunk records its prompt logprobs (``Request.prompt_logprobs``, each position once); a verify
run accepts its drafts while they equal the token sampled at their parent (a chain, or a path down a tree:
exact rejection sampling for deterministic drafts, xyjax.engine.speculative) and rolls ``num_computed`` back to
the accepted path. Then the sampled tokens are appended (a decode or a prefill end: one; a verify run: the
accepted drafts and the token after them) with their logprobs, each checked for a stop and advancing the
request's structured-outputs grammar (``Request.append``; rejected drafts never reach it); a request that stops
(or with max_tokens 0, whose prompt is scored) finishes (``Scheduler.finish``: cached and freed).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from xyjax.engine.batch import ScheduledBatch, Stage
from xyjax.engine.request import Request
from xyjax.engine.speculative import accepted_path, kv_moves
from xyjax.ops.sampler import SamplerOutput

if TYPE_CHECKING:
    from xyjax.engine.scheduler import Scheduler

# The sampler drew a token the grammar's mask excludes: only when the mask allows nothing (all of its tokens
# masked by allowed_token_ids, bad_words or min_tokens).
GRAMMAR_REFUSED = ("token {} does not follow the structured_outputs grammar: allowed_token_ids, bad_words or "
                   "min_tokens masked every token the grammar allows")


def apply(sched: Scheduler, batch: ScheduledBatch, out: SamplerOutput) -> list[tuple[int, int]]:
    """Apply ``out`` (sampled rows in the order of ``batch.seqs``). Returns the (src, dst) KV slot moves that
    put accepted tree nodes at their positions, for the runner to apply before the next step."""
    now, offset, moves, appends = time.perf_counter(), 0, [], []
    for seq in batch.seqs:
        req, k = seq.request, seq.num_samples
        req.num_computed += seq.num_tokens
        if seq.stage is Stage.PREFILL:
            sched.cache_computed(req)
            if req.scores_prompt:            # then every row of the chunk was sampled
                _score(req, out, offset, req.num_computed - k + 1, k)
        if seq.appends:
            path = _verify(sched, req, out.tokens[offset:offset + k], moves) if seq.stage is Stage.VERIFY else [k - 1]
            appends.append((req, offset, path))
        offset += k
    for req, offset, path in appends:          # after every prefill is cached: a finish caches after them
        _append(sched, req, out, offset, path, now)
    return moves


def _entry(out: SamplerOutput, row: int, token: int, n: int) -> dict[int, float]:
    """{token: its logprob, then the top n ids: theirs} of sampled row ``row``."""
    top = zip(out.top_ids[row, :n].tolist(), out.top_logprobs[row, :n].tolist())
    return {token: float(out.logprob[row]), **dict(top)}


def _score(req: Request, out: SamplerOutput, offset: int, first: int, k: int) -> None:
    """Record the prompt logprobs of a prefill chunk's ``k`` rows from ``offset``, row i scoring prompt token
    ``first + i``: each prompt position once (a recompute after preemption scores rows again)."""
    prompt = req.prompt_token_ids
    for pos in range(max(first, len(req.prompt_logprobs)), min(len(prompt), first + k)):
        req.prompt_logprobs.append(_entry(out, offset + pos - first, prompt[pos], req.params.prompt_logprobs))


def _verify(sched: Scheduler, req: Request, sampled, moves: list[tuple[int, int]]) -> list[int]:
    """Accept ``req``'s drafts against the tokens ``sampled`` at its verify rows: returns the accepted path's
    rows, rolls ``num_computed`` back to it (rejected KV is dead, overwritten later) and adds the slot moves
    that put a tree path's KV at its positions to ``moves``."""
    tree = req.draft_tree()
    path = accepted_path(tree, [int(t) for t in sampled])
    drafted, accepted = len(tree.tokens), len(path) - 1
    start = req.num_computed - len(sampled)                # position of the run's root
    req.num_computed = start + len(path)
    bs, table = sched.blocks.block_size, req.block_table
    moves += kv_moves(path, start, lambda pos: table[pos // bs] * bs + pos % bs)
    req.clear_draft()
    if req.spec is not None:
        req.spec.update(drafted, accepted)
    req.metrics.num_draft_tokens += drafted
    req.metrics.num_accepted_tokens += accepted
    s = sched.stats
    s.spec_verify_runs += 1
    s.spec_drafted_tokens += drafted
    s.spec_accepted_tokens += accepted
    return path


def _append(sched: Scheduler, req: Request, out: SamplerOutput, offset: int, path: list[int], now: float) -> None:
    """Append the tokens sampled at rows ``offset + path`` with their logprobs until one finishes ``req``."""
    if not req.params.max_tokens:             # prompt logprobs only: done once the prompt is scored
        sched.finish(req, "length")
        return
    sampled = [int(t) for t in out.tokens[offset:offset + max(path) + 1]]
    for row in path:
        if req.logprobs is not None:
            req.logprobs.append(_entry(out, offset + row, sampled[row], req.params.logprobs))
        req.metrics.first_token_time = req.metrics.first_token_time or now
        sched.stats.generated_tokens += 1
        reason = req.append(sampled[row], sched.max_model_len)
        if reason:
            sched.finish(req, reason, error=GRAMMAR_REFUSED.format(sampled[row]) if reason == "error" else None)
            return
