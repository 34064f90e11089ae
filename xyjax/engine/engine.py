"""Engine: requests in, one hybrid P/D/V step at a time, output deltas out.

``add_request`` queues a request; ``step`` schedules (xyjax.engine.scheduler), plans the bucketed arrays
(xyjax.engine.planner), runs the jitted step (xyjax.engine.runner), then applies sampled tokens: prefill chunks that
reach the end of their tokens and decodes append one token; a verify run accepts its drafts while they
equal the token sampled at their parent (a chain, or a path down a tree), then appends the sampled one
(exact rejection sampling for deterministic drafts, xyjax.engine.speculative); stop conditions and detokenization
follow, and each changed request yields a RequestOutput delta. With the ``speculative`` option the engine
drafts (xyjax.engine.drafters) for every decoding request before scheduling.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
from tqdm import tqdm

from models.loader import LoadedModel
from models.tokenizer import IncrementalDetokenizer
from xyjax.engine.block_manager import BlockManager
from xyjax.engine.config import EngineConfig
from xyjax.ops import Backends
from xyjax.ops.gemm import prepare_weights
from xyjax.ops.gemm.profile import load_default
from xyjax.ops.kv_cache import bytes_per_token
from xyjax.engine.outputs import RequestMetrics, RequestOutput
from xyjax.engine.planner import Planner
from xyjax.engine.prefix_cache import PrefixCache
from xyjax.engine.request import Request, Status
from xyjax.engine.runner import Runner, enable_persistent_cache
from xyjax.ops.sampler import SamplerOutput
from xyjax.engine.sampling_params import SamplingParams
from xyjax.engine.scheduler import Scheduler, Stage
from xyjax.engine.speculative import AdaptiveControl, accepted_path, kv_moves
from xyjax.engine.stats import EngineStats, StepTimer


class Engine:
    """Owns the scheduler, the planner, the runner and every live request."""

    def __init__(self, model: LoadedModel, config: EngineConfig, progress: bool = True):
        self.model, self.config, self.tokenizer = model, config, model.tokenizer
        cfg = model.config
        per_block = config.block_size * bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype)
        num_blocks = config.kv_cache_memory // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds {num_blocks} blocks of "
                             f"{per_block} bytes; at least 2 are needed")
        self.stats = EngineStats()
        self.blocks = BlockManager(num_blocks, config.block_size)
        # One sequence of max_model_len tokens (plus drafts) always fits the pool, so a request alone progresses.
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
                                 num_blocks * config.block_size - config.max_draft_tokens)
        self.prefix_cache = PrefixCache(self.blocks) if config.enable_prefix_caching else None
        self.scheduler = Scheduler(config, self.blocks, self.prefix_cache, self.stats)
        self.planner = Planner(config, self.max_model_len, cfg.num_kv_heads)
        if config.compilation_cache_dir:
            enable_persistent_cache(config.compilation_cache_dir)
        self.backends = Backends(attention=config.attention_backend, gemm=config.gemm_backend,
                                 gemm_profile=load_default(config.gemm_backend) if config.gemm_backend != "xla"
                                 else None)
        self.max_logprobs = min(config.max_logprobs, cfg.vocab_size)   # top-k over the vocabulary at most
        params = prepare_weights(model.params, config.gemm_backend, config.weight_layout)
        self.runner = Runner(cfg, params, num_blocks, config.block_size, self.backends, self.stats, model.dtype,
                             num_logprobs=self.max_logprobs,
                             max_moves=config.max_num_seqs * config.max_draft_tokens)
        self.requests: dict[str, Request] = {}
        self._reported: list[Request] = []        # finished outside a step (bad prompt, abort): next step reports
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.drafter = config.speculative.drafter() if config.speculative else None
        if config.precompile:
            self.precompile(progress)

    def precompile(self, progress: bool = True) -> None:
        """Compile (or load from the persistent cache) the step program of every token bucket."""
        start = time.perf_counter()
        for bucket in tqdm(self.config.token_buckets, desc="compiling step buckets", disable=not progress):
            self.runner.run(*self.planner.empty(bucket))
        self.runner.copy_blocks([(0, 0)])      # the copy-on-write program
        if self.planner.trees:
            self.runner.move_slots([])          # the tree KV move program
        self.stats.startup_seconds += time.perf_counter() - start

    # ---- requests -------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request and return its id. A bad prompt or parameter does not raise: the request finishes
        at once with finish_reason "error" (reported by the next ``step``). A live duplicate id raises."""
        params = params or SamplingParams()
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop_ids = self._stop_ids(params)
        try:
            ids, error = self._validate(prompt, params, stop_ids), None
        except ValueError as e:
            ids, error = [], str(e)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                      prompt_token_ids=ids, params=params, seed=seed, arrival=next(self._ids), stop_ids=stop_ids,
                      metrics=RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)))
        req.logprobs = [] if params.logprobs is not None else None
        self.requests[request_id] = req
        if error:
            self._finish(req, "error", error=error)
        else:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            self.scheduler.add(req)
        return request_id

    def _validate(self, prompt, params: SamplingParams, stop_ids: frozenset[int]) -> list[int]:
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
        if params.logprobs is not None and params.logprobs > self.max_logprobs:
            raise ValueError(f"logprobs={params.logprobs} exceeds the engine's max_logprobs={self.max_logprobs} "
                             f"(max_logprobs={self.config.max_logprobs}, vocabulary {self.model.config.vocab_size})")
        if len(stop_ids) > self.config.max_stop_ids and params.min_tokens:
            raise ValueError(f"min_tokens needs {len(stop_ids)} stop token ids masked; the engine masks "
                             f"at most max_stop_ids={self.config.max_stop_ids}")
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; an unknown or finished id is a no-op."""
        req = self.requests.get(str(request_id))
        if req is not None and not req.finished:
            self._finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. Returns a delta (new tokens and text) for every request that changed, finished ones
        included (then with metrics); a finished request's id is forgotten after it is reported."""
        changed = {}
        timer = StepTimer(self.stats)
        if self.drafter:
            self._draft()
        batch = self.scheduler.schedule()
        if batch.seqs:
            timer.scheduled()
            inputs, sampling = self.planner.plan(batch)
            timer.planned()
            self.runner.copy_blocks(batch.copies)
            out = self.runner.run(inputs, sampling)
            timer.ran(batch, bucket=inputs.token_ids.shape[0])
            start, now = timer.start, timer.end_of_run
            offset, sampled, moves = 0, [], []
            for seq in batch.seqs:
                req, k = seq.request, seq.num_samples
                req.metrics.first_scheduled_time = req.metrics.first_scheduled_time or start
                req.num_computed += seq.num_tokens
                if seq.stage is Stage.PREFILL:
                    self.scheduler.cache_computed(req)
                if k:
                    path = self._verify(req, out.tokens[offset:offset + k], moves) if seq.stage is Stage.VERIFY else [0]
                    sampled.append((req, offset, path))
                offset += k
            if moves:                         # before anything (a finish caching its prefix) reads that KV
                self.runner.move_slots(moves)
            for req, offset, path in sampled:
                self._apply(req, out, offset, path, now)
                changed[req] = None
        elif self.scheduler.has_unfinished():   # cannot happen while every prompt fits the pool: never spin
            raise RuntimeError(f"scheduler found no work for {len(self.scheduler.waiting)} waiting requests")
        changed.update(dict.fromkeys(self._reported))
        self._reported = []
        outputs = [self._delta(req) for req in changed]
        for req in changed:
            if req.finished:
                self.requests.pop(req.request_id, None)
        timer.done()
        return outputs

    def _draft(self) -> None:
        """Propose drafts for every running request that decodes next, within its adaptive budget, its
        remaining max_tokens and the context length."""
        k = self.config.speculative.num_draft_tokens
        for req in self.scheduler.running:
            if req.num_pending != 1 or not req.output_ids or not req.params.speculative:
                continue
            if req.spec is None:
                req.spec = AdaptiveControl(ema=k)
            budget = req.spec.budget(k) if self.config.speculative.adaptive else k
            budget = min(budget, req.params.max_tokens - len(req.output_ids) - 1,
                         self.max_model_len - len(req.token_ids))
            req.set_draft(self.drafter.propose(req.token_ids, budget))   # budget <= 0: an empty draft

    def _verify(self, req: Request, sampled, moves: list[tuple[int, int]]) -> list[int]:
        """Accept ``req``'s drafts against the tokens ``sampled`` at its verify rows: returns the accepted
        path's rows, rolls ``num_computed`` back to it (rejected KV is dead, overwritten later) and adds the
        slot moves that put a tree path's KV at its positions to ``moves``."""
        tree = req.draft_tree()
        path = accepted_path(tree, [int(t) for t in sampled])
        drafted, accepted = len(tree.tokens), len(path) - 1
        start = req.num_computed - len(sampled)                # position of the run's root
        req.num_computed = start + len(path)
        bs, table = self.blocks.block_size, req.block_table
        moves += kv_moves(path, start, lambda pos: table[pos // bs] * bs + pos % bs)
        req.clear_draft()
        if req.spec is not None:
            req.spec.update(drafted, accepted)
        req.metrics.num_draft_tokens += drafted
        req.metrics.num_accepted_tokens += accepted
        s = self.stats
        s.spec_verify_runs += 1
        s.spec_drafted_tokens += drafted
        s.spec_accepted_tokens += accepted
        return path

    def _apply(self, req: Request, out: SamplerOutput, offset: int, path: list[int], now: float) -> None:
        """Append the tokens sampled at rows ``offset + path`` (a decode or prefill end: path [0])."""
        sampled = [int(t) for t in out.tokens[offset:offset + max(path) + 1]]
        for row in path:
            if req.logprobs is not None:
                top = dict(zip(out.top_ids[offset + row, :req.params.logprobs].tolist(),
                               out.top_logprobs[offset + row, :req.params.logprobs].tolist()))
                req.logprobs.append({sampled[row]: float(out.logprob[offset + row]), **top})
            self._append(req, sampled[row], now)
            if req.finished:
                break

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a request: its stop_token_ids, and EOS unless ignore_eos."""
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.tokenizer.stop_token_ids
        return frozenset(ids)

    # ---- outputs --------------------------------------------------------------------------------
    def _append(self, req: Request, token: int, now: float) -> None:
        req.token_ids.append(token)
        req.metrics.num_output_tokens += 1
        req.metrics.first_token_time = req.metrics.first_token_time or now
        self.stats.generated_tokens += 1
        delta = req.detokenizer.add(token)
        req.text += delta
        p, n = req.params, len(req.output_ids)
        reason = None
        if n >= p.min_tokens and token in req.stop_ids:
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
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        req.metrics.finished_time = time.perf_counter()
        if reason == "error":
            self.stats.errors += 1
        elif reason == "abort":
            self.stats.aborted += 1
        else:
            self.stats.finished += 1
        self._reported.append(req)

    def _delta(self, req: Request) -> RequestOutput:
        """What ``req`` produced since its last delta. Text that may still become a stop string is held back
        until it cannot (or the request finishes)."""
        holdback = 0 if req.finished else max((len(s) for s in req.params.stop), default=1) - 1
        text_end = max(req.sent_text, len(req.text) - holdback)
        out = RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                            token_ids=req.output_ids[req.sent_tokens:], text=req.text[req.sent_text:text_end],
                            finish_reason=req.finish_reason, error=req.error,
                            logprobs=None if req.logprobs is None else req.logprobs[req.sent_tokens:],
                            metrics=req.metrics)
        req.sent_tokens, req.sent_text = len(req.output_ids), text_end
        return out
