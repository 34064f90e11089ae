"""Engine: requests in, one hybrid P/D/V step at a time, output deltas out.

``add_request`` validates and queues a request; ``step`` drafts (with the ``speculative`` option,
xyjax.engine.drafters), schedules (xyjax.engine.scheduler), plans the bucketed arrays (xyjax.engine.planner), runs
the jitted step (xyjax.engine.runner), has the scheduler apply its results (xyjax.engine.postprocess) and hands
each changed request's RequestOutput delta back. Counters live in one EngineStats (xyjax.engine.stats).
"""

from __future__ import annotations

import functools
import itertools
import time

import jax
import numpy as np
from tqdm import tqdm

from models.loader import LoadedModel
from models.tokenizer import IncrementalDetokenizer
from xyjax.engine.block_manager import BlockManager
from xyjax.engine.config import EngineConfig
from xyjax.engine.drafters import DraftTree
from xyjax.ops import Backends
from xyjax.ops.gemm import prepare_weights
from xyjax.ops.gemm.formats import with_activation_quant
from xyjax.ops.gemm.profile import load_default
from xyjax.ops.kv_cache import bytes_per_token
from xyjax.engine.outputs import RequestMetrics, RequestOutput
from xyjax.engine.distributed import Leader
from xyjax.engine.parallel import make_mesh, shard_model
from xyjax.engine.planner import Planner
from xyjax.engine.prefix_cache import PrefixCache
from xyjax.engine.request import Request
from xyjax.engine.runner import Runner, enable_persistent_cache
from xyjax.engine.sampling_params import SamplingParams
from xyjax.engine.scheduler import Scheduler
from xyjax.engine.speculative import AdaptiveControl
from xyjax.engine.stats import EngineStats, StepTimer
from xyjax.engine.structured import Grammar, grammar_tokenizer


def held_weights(params: dict, config: EngineConfig) -> dict:
    """The model's params as the engine holds them: in the gemm backend's weight layout, the dense layers'
    (``params["layers"]``) inputs quantized as ``activation_quant`` says (the embedding and LM head stay exact)."""
    layout = "blocks" if config.activation_quant != "none" and config.weight_layout == "auto" else config.weight_layout
    params = prepare_weights(params, config.gemm_backend, layout)
    return dict(params, layers=with_activation_quant(params["layers"], config.activation_quant))


class Engine:
    """Owns the scheduler, the planner, the runner, the stats and every live request (``requests``: id ->
    Request, until its finish is reported)."""

    def __init__(self, model: LoadedModel, config: EngineConfig, progress: bool = True, devices=None):
        """``devices``: where the step runs (tensor_parallel_size of them; default the first of ``jax.devices()``)."""
        self.model, self.config, self.tokenizer = model, config, model.tokenizer
        cfg = model.config
        tp = config.tensor_parallel_size
        mesh = make_mesh(tp, devices) if tp > 1 or devices is not None else None
        per_block = config.block_size * bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, model.dtype)
        num_blocks = config.kv_cache_memory // per_block
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory} bytes holds {num_blocks} blocks of "
                             f"{per_block} bytes; at least 2 are needed")
        # One sequence of max_model_len tokens (plus drafts) always fits the pool, so a request alone progresses.
        self.max_model_len = min(config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings,
                                 num_blocks * config.block_size - config.max_draft_tokens)
        self.stats = EngineStats()
        blocks = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, blocks, PrefixCache(blocks) if config.enable_prefix_caching else None,
                                   self.stats, self.max_model_len)
        # the task tables describe one tensor-parallel shard's KV heads (each shard runs them on its own)
        self.planner = Planner(config, self.max_model_len, cfg.num_kv_heads // tp, cfg.vocab_size)
        # Not in a jax.distributed job: processes that loaded a step from the persistent cache hung in its first
        # collective (jax 0.12.1, gloo), while freshly compiled ones meet (docs/tp.md).
        if config.compilation_cache_dir and jax.process_count() == 1:
            enable_persistent_cache(config.compilation_cache_dir)
        self.backends = Backends(attention=config.attention_backend, gemm=config.gemm_backend,
                                 gemm_profile=load_default(config.gemm_backend) if config.gemm_backend != "xla"
                                 else None)
        self.max_logprobs = min(config.max_logprobs, cfg.vocab_size)   # top-k over the vocabulary at most
        params = held_weights(model.params, config)
        if mesh is not None:
            params = shard_model(params, cfg, mesh)
        self.stats.weight_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(getattr(params, "leaves", params)))
        self.stats.activation_quant = config.activation_quant
        self.runner = Runner(cfg, params, num_blocks, config.block_size, self.backends, self.stats, model.dtype,
                             num_logprobs=self.max_logprobs,
                             max_moves=config.max_num_seqs * config.max_draft_tokens)
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.drafter = config.speculative.drafter() if config.speculative else None
        if jax.process_count() > 1 and jax.process_index() == 0:
            self.runner = Leader(self.runner)      # the other processes ``follow`` its device operations
        if config.precompile and jax.process_index() == 0:   # the others compile as they follow
            self.precompile(progress)

    def close(self) -> None:
        """Release the other processes of a multi-process engine (``xyjax.engine.distributed``); else a no-op."""
        if isinstance(self.runner, Leader):
            self.runner.stop()

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
            grammar = Grammar(self.grammar_tokenizer, params.structured_outputs) if params.structured_outputs else None
        except ValueError as e:
            ids, grammar, error = [], None, str(e)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**32))
        req = Request(request_id=request_id, prompt=prompt if isinstance(prompt, str) else None,
                      prompt_token_ids=ids, params=params, seed=seed, arrival=next(self._ids), stop_ids=stop_ids,
                      bad_word_ids=self._bad_word_ids(params) if not error else [], grammar=grammar,
                      metrics=RequestMetrics(arrival_time=time.perf_counter(), num_prompt_tokens=len(ids)))
        req.logprobs = [] if params.logprobs is not None else None
        req.prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self.requests[request_id] = req
        if error:
            self.scheduler.finish(req, "error", error=error)
        else:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=params.skip_special_tokens)
            self.scheduler.add(req)
        return request_id

    @functools.cached_property
    def grammar_tokenizer(self):
        """The tokenizer structured outputs match with (llguidance's; built at the first request that needs it)."""
        return grammar_tokenizer(self.tokenizer, self.model.config.vocab_size)

    def _bad_word_ids(self, params: SamplingParams) -> list[list[int]]:
        """Each bad word as token ids, alone and after a space (vLLM: the ways it can start in the output)."""
        words = [self.tokenizer.encode(prefix + w, add_special_tokens=False) for w in params.bad_words or []
                 for prefix in ("", " ")]
        return [ids for ids in words if ids]

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
                             f"{self.scheduler.blocks.num_blocks} blocks of {self.config.block_size})")
        vocab = self.model.config.vocab_size
        if params.logit_bias and len(params.logit_bias) > self.config.max_logit_bias:
            raise ValueError(f"logit_bias has {len(params.logit_bias)} entries; the engine's max_logit_bias is "
                             f"{self.config.max_logit_bias}")
        for name, tokens in (("logit_bias", params.logit_bias or ()),
                             ("allowed_token_ids", params.allowed_token_ids or ())):
            bad = [t for t in tokens if t >= vocab]
            if bad:
                raise ValueError(f"{name} token id {bad[0]} is outside the vocabulary [0, {vocab})")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(params, name)
            if n is not None and n > self.max_logprobs:
                raise ValueError(f"{name}={n} exceeds the engine's max_logprobs={self.max_logprobs} (max_logprobs="
                                 f"{self.config.max_logprobs}, vocabulary {self.model.config.vocab_size})")
        if len(stop_ids) > self.config.max_stop_ids and params.min_tokens:
            raise ValueError(f"min_tokens needs {len(stop_ids)} stop token ids masked; the engine masks "
                             f"at most max_stop_ids={self.config.max_stop_ids}")
        return ids

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks; an unknown or finished id is a no-op."""
        req = self.requests.get(str(request_id))
        if req is not None and not req.finished:
            self.scheduler.finish(req, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step. Returns a delta (new tokens and text) for every request that changed, finished ones
        included (then with metrics); a finished request's id is forgotten after it is reported."""
        timer = StepTimer(self.stats)
        self._draft()
        batch = self.scheduler.schedule()
        if batch.seqs:
            timer.scheduled()
            inputs, sampling = self.planner.plan(batch)
            timer.planned()
            self.runner.copy_blocks(batch.copies)
            out = self.runner.run(inputs, sampling)
            timer.ran(batch, bucket=inputs.token_ids.shape[0])
            moves = self.scheduler.postprocess(batch, out)
            if moves:                         # before the next step reads that KV
                self.runner.move_slots(moves)
        elif self.scheduler.has_unfinished():   # cannot happen while every prompt fits the pool: never spin
            raise RuntimeError(f"scheduler found no work for {len(self.scheduler.waiting)} waiting requests")
        outputs = self._outputs([seq.request for seq in batch.seqs if seq.appends])
        timer.done()
        return outputs

    def _draft(self) -> None:
        """Propose drafts (with the ``speculative`` option) for every running request that decodes next, within
        its adaptive budget, its remaining max_tokens and the context length."""
        if not self.drafter:
            return
        k = self.config.speculative.num_draft_tokens
        for req in self.scheduler.running:
            if req.num_pending != 1 or not req.output_ids or not req.params.speculative:
                continue
            if req.spec is None:
                req.spec = AdaptiveControl(ema=k)
            budget = req.spec.budget(k) if self.config.speculative.adaptive else k
            budget = min(budget, req.params.max_tokens - len(req.output_ids) - 1,
                         self.max_model_len - len(req.token_ids))
            tree = self.drafter.propose(req.token_ids, budget)      # budget <= 0: an empty draft
            if req.grammar is not None and tree.is_chain:          # drafts the grammar refuses are never accepted
                tree = DraftTree.chain(tree.tokens[:req.grammar.valid_prefix(tree.tokens)])
            req.set_draft(tree)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The token ids that end a request: its stop_token_ids, and EOS unless ignore_eos."""
        ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            ids |= self.tokenizer.stop_token_ids
        return frozenset(ids)

    # ---- outputs --------------------------------------------------------------------------------
    def _outputs(self, sampled: list[Request]) -> list[RequestOutput]:
        """Deltas of the requests that sampled in this step and of those finished since the last one (an
        abort or a bad prompt in between); finished requests are forgotten."""
        changed = dict.fromkeys(sampled)
        changed.update(dict.fromkeys(self.scheduler.take_finished()))
        outputs = [self._delta(req) for req in changed]
        for req in changed:
            if req.finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _delta(self, req: Request) -> RequestOutput:
        """What ``req`` produced since its last delta (the first: with its prompt logprobs). Text that may still
        become a stop string is held back until it cannot (or the request finishes)."""
        holdback = 0 if req.finished else max((len(s) for s in req.params.stop), default=1) - 1
        first = req.sent_tokens == 0             # the prompt is done: its first delta carries prompt_logprobs
        text_end = max(req.sent_text, len(req.text) - holdback)
        out = RequestOutput(request_id=req.request_id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
                            token_ids=req.output_ids[req.sent_tokens:], text=req.text[req.sent_text:text_end],
                            finish_reason=req.finish_reason, error=req.error,
                            logprobs=None if req.logprobs is None else req.logprobs[req.sent_tokens:],
                            prompt_logprobs=req.prompt_logprobs if first else None, metrics=req.metrics)
        req.sent_tokens, req.sent_text = len(req.output_ids), text_end
        return out
