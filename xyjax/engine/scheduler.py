"""Token-wise hybrid scheduler (host): fills each step's token budget with P, D and V tokens.

Order within a step (XY-Serve §4.1): first one decode token (D) or one verify run (V: the pending token
plus its drafts) for every running request whose prompt is done, oldest first, so time between tokens
stays steady; then the rest of the budget goes to prefill chunks (P): requests part-way through their
prompt (oldest first), then waiting requests admitted in arrival order (FCFS, up to ``max_num_seqs``
running). KV blocks are taken as tokens are scheduled. An admitted request first takes its longest cached
prefix from the prefix cache (token-wise: full blocks shared, a partial last block copied on write) and only
its uncached tokens count against the budget. When the pool runs short, idle cached prefixes are evicted (LRU)
first; then, if a decode or verify still needs a block, the newest running request is preempted (its blocks
freed, recomputed later from its tokens); prefill chunks never preempt, they take what is free. A request
scoring its prompt (prompt_logprobs) takes no cached prefix and its chunks sample every row, so they are capped
to keep the step's sampled rows within max_num_seqs * (1 + max_draft_tokens) (``_RowBudget``).

After the step runs, ``postprocess`` (xyjax.engine.postprocess) applies its results: the scheduler is the one
owner of request state after scheduling (computed tokens, verify acceptance and rollback, prefix-cache
insertion, appended tokens, stop checks, finishing and freeing).
"""

from __future__ import annotations

import collections
import time

from xyjax.engine import postprocess
from xyjax.engine.batch import ScheduledBatch, ScheduledSeq, Stage
from xyjax.engine.block_manager import BlockManager
from xyjax.engine.config import EngineConfig
from xyjax.engine.prefix_cache import PrefixCache
from xyjax.engine.request import Request, Status
from xyjax.engine.stats import EngineStats
from xyjax.ops.sampler import SamplerOutput


class Scheduler:
    """Owns the waiting queue (arrival order), the running list, the KV ``blocks`` and the prefix ``cache``
    (None: off), and the requests finished since the engine last took them (``take_finished``). Records into
    ``stats`` (a fresh EngineStats if None) and gives it its gauges. ``max_model_len``: the context length
    (default: the pool)."""

    def __init__(self, config: EngineConfig, blocks: BlockManager, cache: PrefixCache | None = None,
                 stats: EngineStats | None = None, max_model_len: int | None = None):
        self.config, self.blocks, self.cache = config, blocks, cache
        self.stats = stats or EngineStats()
        self.stats.gauges = self.gauges
        self.max_model_len = max_model_len or blocks.num_blocks * blocks.block_size
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._copies: list[tuple[int, int]] = []
        self._finished: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def gauges(self) -> dict:
        """KV blocks: total, free (no request holds them: the free pool and blocks only the prefix cache holds,
        which it gives back on demand) and cached (held by the prefix cache); running and waiting requests."""
        cache = self.cache
        return dict(kv_blocks_total=self.blocks.num_blocks,
                    kv_blocks_free=self.blocks.num_free + (cache.num_idle_blocks if cache else 0),
                    kv_blocks_cached=len(cache.cached) if cache else 0,
                    running=len(self.running), waiting=len(self.waiting))

    def finish(self, req: Request, reason: str, error: str | None = None) -> None:
        """End ``req`` with finish_reason ``reason`` (stop, length, abort, error): out of the queues, its
        computed tokens cached, its blocks freed; ``take_finished`` hands it to the engine."""
        req.finish_reason, req.error = reason, error
        self.remove(req)
        req.status = Status.FINISHED
        req.metrics.finished_time = time.perf_counter()
        if reason == "error":
            self.stats.errors += 1
        elif reason == "abort":
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        self._finished.append(req)

    def take_finished(self) -> list[Request]:
        """The requests finished since the last call."""
        finished, self._finished = self._finished, []
        return finished

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues, cache its computed tokens and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.cache_computed(req)
        self.blocks.free(req.block_table)

    def cache_computed(self, req: Request) -> None:
        """Offer the tokens of ``req`` whose KV is computed to the prefix cache."""
        if self.cache and req.num_computed:
            self.cache.insert(req.token_ids[:req.num_computed], req.block_table)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        preempted: list[Request] = []
        seqs = self._fill(preempted)
        while not seqs and self.running:   # every running prompt is stuck on a full pool: free the newest
            self._preempt(max(self.running, key=lambda r: r.arrival), preempted)
            seqs = self._fill(preempted)
        copies, self._copies = self._copies, []
        now = time.perf_counter()
        for seq in seqs:
            seq.request.metrics.first_scheduled_time = seq.request.metrics.first_scheduled_time or now
        return ScheduledBatch(seqs, preempted, copies)

    def postprocess(self, batch: ScheduledBatch, out: SamplerOutput) -> list[tuple[int, int]]:
        """Apply the results of ``batch``'s step (xyjax.engine.postprocess); returns the KV slot moves for the
        runner to apply before the next step."""
        return postprocess.apply(self, batch, out)

    def _fill(self, preempted: list[Request]) -> list[ScheduledSeq]:
        budget, seqs = self.config.max_num_batched_tokens, []
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.num_pending != 1 or req.status is not Status.RUNNING:
                continue
            n = 1 + len(req.draft_token_ids)
            if self._reserve(req, req.num_computed + n, preempted):
                stage = Stage.VERIFY if req.draft_token_ids else (Stage.DECODE if req.output_ids else Stage.PREFILL)
                seqs.append(ScheduledSeq(req, stage, n))
                budget -= n
        chunks = sorted((r for r in self.running if r.num_pending > 1), key=lambda r: r.arrival)
        rows = _RowBudget(self.config, seqs, len(chunks) + min(len(self.waiting),
                                                               self.config.max_num_seqs - len(self.running)))
        for req in chunks:
            n = self._chunk(req, rows.limit(req, budget))
            if n:
                seqs.append(rows.take(ScheduledSeq(req, Stage.PREFILL, n)))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req in preempted:             # not back in the step that preempted it
                break
            n = self._admit(req, rows.limit(req, budget))
            if not n:
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            seqs.append(rows.take(ScheduledSeq(req, Stage.PREFILL, n)))
            budget -= n
        return seqs

    def _admit(self, req: Request, budget: int) -> int:
        """Give ``req`` its cached prefix and the blocks of its first chunk, leaving a block per running request
        for its next decode so admission forces no preemption. Returns the chunk (0: not admitted, nothing held)."""
        bs, hit = self.blocks.block_size, 0
        if self.cache and not req.scores_prompt:
            # The last token is always computed (its logits give the next token); a hit never ends inside the
            # pool's last block, whose copy would not fit beside a request as long as the pool.
            limit = min(len(req.token_ids) - 1, (self.blocks.num_blocks - 1) * bs)
            hit, cached = self.cache.match(req.token_ids[:limit])
            self.blocks.share(req.block_table, cached)
        tail = int(hit % bs != 0)            # a partial last block is copied before the request writes into it
        n = min(len(req.token_ids) - hit, budget)
        self._make_room(self.blocks.blocks_needed(req.block_table, hit + n) + tail + len(self.running))
        room = (len(req.block_table) + self.blocks.num_free - len(self.running) - tail) * bs - hit
        n = min(n, room)
        if n <= 0:
            self.blocks.free(req.block_table)
            return 0
        if tail:
            self._copies.append(self.blocks.copy_on_write(req.block_table))
        req.num_computed = hit
        self.blocks.grow(req.block_table, hit + n)
        if self.cache and not req.scores_prompt:
            s = self.stats
            s.prefix_lookups += 1
            s.prefix_lookup_tokens += len(req.token_ids)
            s.prefix_hit_tokens += hit
            s.prefix_block_hit_tokens += hit // bs * bs
            s.prefix_copies += tail
        return n

    def _chunk(self, req: Request, budget: int) -> int:
        """The largest prefill chunk of ``req`` within ``budget`` whose blocks are available; blocks taken."""
        n = min(req.num_pending, budget)
        self._make_room(self.blocks.blocks_needed(req.block_table, req.num_computed + n))
        room = (len(req.block_table) + self.blocks.num_free) * self.blocks.block_size - req.num_computed
        n = max(0, min(n, room))
        if n:
            self.blocks.grow(req.block_table, req.num_computed + n)
        return n

    def _reserve(self, req: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Grow ``req``'s blocks to ``num_tokens``, preempting the newest running request while the pool is
        short (after evicting idle cached prefixes). False if ``req`` itself was preempted. Decodes are visited
        oldest first, so a victim is never a request already scheduled in this step."""
        while True:
            self._make_room(self.blocks.blocks_needed(req.block_table, num_tokens))
            if self.blocks.grow(req.block_table, num_tokens):
                return True
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim, preempted)
            if victim is req:
                return False

    def _make_room(self, num_blocks: int) -> None:
        """Evict idle cached prefixes (least recently used first) until ``num_blocks`` blocks are free, or all."""
        short = num_blocks - self.blocks.num_free
        if self.cache and short > 0:
            self.stats.prefix_evicted_blocks += self.cache.evict(short)

    def _preempt(self, req: Request, preempted: list[Request]) -> None:
        """Back to waiting; its blocks are freed (the cache keeps what it cached of them)."""
        self.blocks.free(req.block_table)
        req.num_computed, req.status = 0, Status.WAITING
        req.clear_draft()
        req.metrics.num_preemptions += 1
        self.stats.preemptions += 1
        self.running.remove(req)
        position = sum(1 for r in self.waiting if r.arrival < req.arrival)   # keep the queue in arrival order
        self.waiting.insert(position, req)
        preempted.append(req)


class _RowBudget:
    """The sampled rows left in one step: at most max_num_seqs * (1 + max_draft_tokens), which the planner's R
    holds in every bucket. A decode or verify run samples 1 + drafts rows, a prefill chunk at most one, except a
    prompt-scoring chunk (every row), which is capped to leave a row for each of the ``later`` prefill chunks the
    step may still take, so no other request's scheduling changes."""

    def __init__(self, config: EngineConfig, seqs: list[ScheduledSeq], later: int):
        self.left = config.max_num_seqs * (1 + config.max_draft_tokens) - sum(s.num_samples for s in seqs)
        self.later = later

    def limit(self, req: Request, budget: int) -> int:
        """The tokens ``req``'s next chunk may have (``budget``, capped for a prompt-scoring request)."""
        self.later -= 1
        return min(budget, self.left - self.later) if req.scores_prompt else budget

    def take(self, seq: ScheduledSeq) -> ScheduledSeq:
        self.left -= seq.num_samples
        return seq
