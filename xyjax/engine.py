"""Engine: admits requests, schedules each step, runs it, applies sampled tokens and stop conditions.

This first scheduler is simple and correct: a step is either a prefill step (pending prompt chunks
under ``max_num_batched_tokens``, oldest first) or a decode step (one token for every running request).
A waiting request is admitted only when its whole prompt's blocks are free (taken at admission), so a
started prefill never stalls; when decodes run the pool short, the newest running request is
preempted and later recomputed.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np

from models.llama import Backends
from models.loader import LoadedModel
from models.tokenizer import IncrementalDetokenizer
from xyjax.block_manager import BlockManager
from xyjax.config import EngineConfig
from xyjax.kv_cache import bytes_per_token
from xyjax.outputs import RequestOutput
from xyjax.request import Request, Status
from xyjax.runner import Runner
from xyjax.sampling_params import SamplingParams


class Engine:
    """Owns the model runner, the block pool and every request's state."""

    def __init__(self, model: LoadedModel, config: EngineConfig):
        self.model, self.config, self.tokenizer = model, config, model.tokenizer
        cfg = model.config
        per_block = config.block_size * bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype)
        num_blocks = config.kv_cache_memory // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds {num_blocks} blocks of "
                             f"{per_block} bytes; at least 2 are needed")
        self.blocks = BlockManager(num_blocks, config.block_size)
        # One sequence of max_model_len tokens always fits the pool, so a request alone always progresses.
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
                                 num_blocks * config.block_size)
        self.runner = Runner(cfg, model.params, num_blocks, config.block_size,
                             Backends(attention=config.attention_backend, gemm=config.gemm_backend), model.dtype)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.stats = collections.Counter(steps=0, prefill_tokens=0, decode_tokens=0, generated_tokens=0, preemptions=0,
                                         finished=0, errors=0, aborted=0)

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Queue a request. A bad prompt finishes it at once with finish_reason "error" (never raises)."""
        try:
            ids, error = self._validate_prompt(prompt), None
        except ValueError as e:
            ids, error = [], str(e)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(request_id=request_id or str(next(self._ids)), prompt=prompt if isinstance(prompt, str) else None,
                      prompt_token_ids=ids, params=params, seed=seed, arrival=next(self._ids))
        if error:
            self._finish(req, "error", error=error)
            return req
        req.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.waiting.append(req)
        return req

    def _validate_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.model.config.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is {self.max_model_len} "
                             f"(prompt + at least 1 generated token must fit; it is also capped by the KV pool, "
                             f"{self.blocks.num_blocks} blocks of {self.blocks.block_size})")
        return ids

    def abort(self, request_id: str) -> None:
        for req in itertools.chain(self.running, self.waiting):
            if req.request_id == request_id:
                self._finish(req, "abort")
                return

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Schedule and run one step. Returns the requests that produced a token or finished."""
        batch = self._schedule_prefill() or self._schedule_decode()
        if not batch:
            if self.has_unfinished():  # cannot happen while every prompt fits the pool; never spin silently
                raise RuntimeError(f"scheduler found no work for {len(self.waiting)} waiting requests")
            return []
        banned = [self._banned(req) for req, _ in batch]
        sampled = self.runner.run(batch, banned)
        self.stats["steps"] += 1
        changed = []
        for (req, n), token in zip(batch, sampled):
            self.stats["prefill_tokens" if n > 1 or not req.output_ids else "decode_tokens"] += n
            req.num_computed += n
            if req.num_pending == 0:
                self._append(req, int(token))
                changed.append(req)
        return changed

    def _schedule_prefill(self) -> list[tuple[Request, int]]:
        budget = self.config.max_num_batched_tokens
        batch = []
        for req in sorted((r for r in self.running if r.num_pending > 1), key=lambda r: r.arrival):
            n = min(req.num_pending, budget)  # its blocks were all taken at admission
            if n:
                batch.append((req, n))
                budget -= n
        while self.waiting and budget and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            n = min(req.num_pending, budget)
            if not self.blocks.grow(req.block_table, req.num_pending):  # the whole prompt's blocks, up front
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    def _schedule_decode(self) -> list[tuple[Request, int]]:
        batch = []
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req.status is Status.RUNNING and self._reserve(req, req.num_computed + 1):
                batch.append((req, 1))
        return batch

    def _reserve(self, req: Request, num_tokens: int) -> bool:
        """Grow ``req``'s blocks to ``num_tokens``, preempting the newest running requests while the pool is
        short. False if ``req`` itself had to be preempted. Decode order is oldest first, so a victim is
        never a request already in this step's batch."""
        while not self.blocks.grow(req.block_table, num_tokens):
            victim = max(self.running, key=lambda r: r.arrival)
            self._preempt(victim)
            if victim is req:
                return False
        return True

    def _preempt(self, req: Request) -> None:
        self.blocks.free(req.block_table)
        req.num_computed, req.status = 0, Status.WAITING
        self.running.remove(req)
        self.waiting.appendleft(req)
        self.stats["preemptions"] += 1

    def _banned(self, req: Request) -> list[int]:
        """Stop tokens masked until min_tokens outputs exist."""
        if len(req.output_ids) >= req.params.min_tokens:
            return []
        return sorted(self._stop_ids(req))

    def _stop_ids(self, req: Request) -> set[int]:
        ids = set(req.params.stop_token_ids)
        if not req.params.ignore_eos:
            ids |= self.tokenizer.stop_token_ids
        return ids

    # ---- outputs --------------------------------------------------------------------------------
    def _append(self, req: Request, token: int) -> None:
        req.token_ids.append(token)
        self.stats["generated_tokens"] += 1
        delta = req.detokenizer.add(token)
        req.text += delta
        p, n = req.params, len(req.output_ids)
        reason = None
        if n >= p.min_tokens and token in self._stop_ids(req):
            req.text += req.detokenizer.flush()
            reason = "stop"
        elif n >= p.min_tokens:
            for s in p.stop:  # only a match ending inside the new delta is new
                at = req.text.find(s, max(0, len(req.text) - len(delta) - len(s) + 1))
                if at >= 0:
                    req.text, reason = req.text[:at], "stop"
                    break
        if reason is None and (n >= p.max_tokens or len(req.token_ids) >= self.max_model_len):
            req.text += req.detokenizer.flush()
            reason = "length"
        if reason:
            self._finish(req, reason)

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        req.finish_reason, req.error = reason, error
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.blocks.free(req.block_table)
        req.status = Status.FINISHED
        self.stats[{"error": "errors", "abort": "aborted"}.get(reason, "finished")] += 1

    @staticmethod
    def output(req: Request) -> RequestOutput:
        return RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                             token_ids=req.output_ids, text=req.text, finish_reason=req.finish_reason, error=req.error)
