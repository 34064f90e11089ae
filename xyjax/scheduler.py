"""Token-wise hybrid scheduler (host): fills each step's token budget with P, D and V tokens.

Order within a step (XY-Serve §4.1): first one decode token (D) or one verify run (V: the pending token
plus its drafts) for every running request whose prompt is done, oldest first, so time between tokens
stays steady; then the rest of the budget goes to prefill chunks (P): requests part-way through their
prompt (oldest first), then waiting requests admitted in arrival order (FCFS, up to ``max_num_seqs``
running). KV blocks are taken as tokens are scheduled. When a decode or verify needs a block and the pool
is empty, the newest running request is preempted (its blocks freed, recomputed later from its tokens);
prefill chunks never preempt, they take what is free.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from xyjax.block_manager import BlockManager
from xyjax.config import EngineConfig
from xyjax.request import Request, Status


class Stage(enum.Enum):
    PREFILL = "P"
    DECODE = "D"
    VERIFY = "V"


@dataclasses.dataclass
class ScheduledSeq:
    """``request`` computes its next ``num_tokens`` tokens (for V: the pending token, then its drafts)."""

    request: Request
    stage: Stage
    num_tokens: int

    @property
    def num_samples(self) -> int:
        """Rows sampled: 0 for a prefill chunk that does not reach the end, 1 + drafts for V, else 1."""
        req = self.request
        if self.stage is Stage.VERIFY:
            return self.num_tokens
        return int(req.num_computed + self.num_tokens == len(req.token_ids))


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq]
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


class Scheduler:
    """Owns the waiting queue (arrival order) and the running list."""

    def __init__(self, config: EngineConfig, blocks: BlockManager):
        self.config, self.blocks = config, blocks
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and free its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_table)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        preempted: list[Request] = []
        seqs = self._fill(preempted)
        while not seqs and self.running:   # every running prompt is stuck on a full pool: free the newest
            self._preempt(max(self.running, key=lambda r: r.arrival), preempted)
            seqs = self._fill(preempted)
        return ScheduledBatch(seqs, preempted)

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
        for req in sorted((r for r in self.running if r.num_pending > 1), key=lambda r: r.arrival):
            n = self._chunk(req, budget)
            if n:
                seqs.append(ScheduledSeq(req, Stage.PREFILL, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            if req in preempted:             # not back in the step that preempted it
                break
            # Leave a block per running request for its next decode, so admission does not force preemptions.
            room = (self.blocks.num_free - len(self.running)) * self.blocks.block_size
            n = min(req.num_pending, budget, room)
            if n <= 0:
                break
            self.blocks.grow(req.block_table, n)
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            seqs.append(ScheduledSeq(req, Stage.PREFILL, n))
            budget -= n
        return seqs

    def _chunk(self, req: Request, budget: int) -> int:
        """The largest prefill chunk of ``req`` within ``budget`` whose blocks are available; blocks taken."""
        room = (len(req.block_table) + self.blocks.num_free) * self.blocks.block_size - req.num_computed
        n = max(0, min(req.num_pending, budget, room))
        if n:
            self.blocks.grow(req.block_table, req.num_computed + n)
        return n

    def _reserve(self, req: Request, num_tokens: int, preempted: list[Request]) -> bool:
        """Grow ``req``'s blocks to ``num_tokens``, preempting the newest running request while the pool is
        short. False if ``req`` itself was preempted. Decodes are visited oldest first, so a victim is never
        a request already scheduled in this step."""
        while not self.blocks.grow(req.block_table, num_tokens):
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim, preempted)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request, preempted: list[Request]) -> None:
        self.blocks.free(req.block_table)
        req.num_computed, req.status, req.draft_token_ids = 0, Status.WAITING, []
        req.metrics.num_preemptions += 1
        self.running.remove(req)
        position = sum(1 for r in self.waiting if r.arrival < req.arrival)   # keep the queue in arrival order
        self.waiting.insert(position, req)
        preempted.append(req)
