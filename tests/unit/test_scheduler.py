"""Scheduler invariants (host only, hypothesis): the budget, the block pool, completion and fairness."""

import collections

from hypothesis import given, settings, strategies as st

from xyjax.engine.block_manager import BlockManager
from xyjax.engine.prefix_cache import PrefixCache
from xyjax.engine.config import EngineConfig
from xyjax.engine.outputs import RequestMetrics
from xyjax.engine.request import Request, Status
from xyjax.engine.sampling_params import SamplingParams
from xyjax.engine.batch import Stage
from xyjax.engine.scheduler import Scheduler


def make_request(i, prompt_len, max_tokens, drafts=0, scores=False):
    req = Request(request_id=str(i), prompt=None, prompt_token_ids=list(range(1, prompt_len + 1)),
                  params=SamplingParams(max_tokens=max_tokens, prompt_logprobs=0 if scores else None), seed=0,
                  arrival=i, metrics=RequestMetrics(arrival_time=0.0))
    req.draft_token_ids = [7] * drafts
    req.prompt_logprobs = [None] if scores else None
    return req


def check_blocks(sched: Scheduler, blocks: BlockManager):
    owners = collections.Counter(b for r in sched.running + list(sched.waiting) for b in r.block_table)
    if sched.cache:
        owners.update(sched.cache.cached)                  # the prefix cache owns one reference per cached block
    else:
        assert all(n == 1 for n in owners.values()), "a block is owned twice without prefix caching"
    assert all(blocks.refcount[b] == n for b, n in owners.items()), "a block's refcount disagrees with its owners"
    assert len(owners) + blocks.num_free == blocks.num_blocks, "a block leaked"
    assert all(not r.block_table for r in sched.waiting), "a waiting request holds blocks"


@settings(max_examples=100, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 12), st.integers(0, 3), st.booleans()),
                         min_size=1, max_size=12),
       arrivals=st.lists(st.integers(0, 6), min_size=12, max_size=12),
       budget=st.sampled_from([16, 24, 32]), num_blocks=st.integers(17, 40), max_num_seqs=st.integers(1, 4),
       prefix_caching=st.booleans())
def test_budget_blocks_completion_and_no_starvation(requests, arrivals, budget, num_blocks, max_num_seqs,
                                                    prefix_caching):
    """Requests arrive over time, with speculative drafts sometimes, some scoring their prompt (prompt_logprobs);
    the fake model appends a token for every sampled row that appends. With prefix caching the prompts (all 1, 2,
    3, ...) share prefixes. Checks each step (the sampled rows fit R; a scoring chunk skips no position) and that
    everyone finishes in bounded steps with every prompt position scored once."""
    block_size = 4
    config = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          max_draft_tokens=3)
    blocks = BlockManager(num_blocks, block_size)
    sched = Scheduler(config, blocks, PrefixCache(blocks) if prefix_caching else None)
    max_len = num_blocks * block_size - 3
    pending = sorted(((arrivals[i], make_request(i, min(p, max_len - m - 1), m, d, sc)) for i, (p, m, d, sc)
                      in enumerate(requests)), key=lambda x: (x[0], x[1].arrival))
    finished, step = [], 0
    longest = sum(len(r.prompt_token_ids) + r.params.max_tokens for _, r in pending)
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        batch = sched.schedule()
        step += 1
        assert step < 20 * longest + 100, "no progress: starvation or livelock"
        assert batch.num_tokens <= budget
        assert len(sched.running) <= max_num_seqs
        assert sum(seq.num_samples for seq in batch.seqs) <= max_num_seqs * (1 + config.max_draft_tokens)
        check_blocks(sched, blocks)
        seen = set()
        for seq in batch.seqs:
            req = seq.request
            assert req.status is Status.RUNNING and req not in seen and req not in batch.preempted
            seen.add(req)
            assert len(req.block_table) * block_size >= req.num_computed + seq.num_tokens
            k = seq.num_samples if seq.stage is Stage.VERIFY else int(seq.appends)
            if req.scores_prompt and seq.stage is Stage.PREFILL:
                assert seq.num_samples == seq.num_tokens and req.num_computed < len(req.prompt_logprobs)
                scored = min(len(req.prompt_token_ids), req.num_computed + seq.num_tokens + 1)
                req.prompt_logprobs += [{}] * (scored - len(req.prompt_logprobs))
            req.num_computed += seq.num_tokens
            if seq.stage is Stage.PREFILL:
                sched.cache_computed(req)
            if seq.stage is Stage.VERIFY:        # accept no draft: keep KV of the pending token only
                req.num_computed -= len(req.draft_token_ids)
                req.draft_token_ids, k = [], 1
            for _ in range(k):
                req.token_ids.append(3)
            if len(req.output_ids) >= req.params.max_tokens:
                sched.remove(req)
                req.status = Status.FINISHED
                finished.append(req)
            elif k and len(req.output_ids) % 2:  # sometimes draft for the next step
                req.draft_token_ids = [5, 6][:min(2, max_len - len(req.token_ids))]
        # every running request whose prompt is done got its decode/verify this step unless it was preempted
        for req in sched.running:
            if req.num_pending == 1 and req not in seen and req.output_ids:
                assert batch.preempted, f"request {req.request_id} skipped a decode step without a preemption"
    assert len(finished) == len(requests)
    assert all(len(r.prompt_logprobs) == len(r.prompt_token_ids) for r in finished if r.prompt_logprobs is not None)
    if prefix_caching:
        sched.cache.evict(num_blocks)
    assert blocks.num_free == num_blocks


def test_decodes_come_first_then_prefill_fills_the_budget():
    config = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    blocks = BlockManager(64, 4)
    sched = Scheduler(config, blocks)
    a, b = make_request(0, 3, 5), make_request(1, 40, 5)
    sched.add(a)
    batch = sched.schedule()                          # a's whole prompt
    a.num_computed += 3
    a.token_ids.append(9)
    sched.add(b)
    batch = sched.schedule()
    assert [(s.request, s.stage, s.num_tokens) for s in batch.seqs] == [(a, Stage.DECODE, 1), (b, Stage.PREFILL, 15)]


def test_a_prompt_scoring_request_cached_below_a_copy_of_its_prefix_is_not_preempted_forever():
    """A request scoring its prompt computes a cached prefix again; were what follows cached below the old copy,
    that copy could not be evicted while the request runs, and a prompt as long as the pool would be preempted
    forever (the livelock hypothesis found). The cache takes the request's copy instead."""
    config = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=1, max_draft_tokens=3)
    blocks = BlockManager(17, 4)
    sched = Scheduler(config, blocks, PrefixCache(blocks))
    first, scorer = make_request(0, 16, 1), make_request(1, 54, 1, scores=True)
    sched.add(first)
    sched.add(scorer)
    for _ in range(30):
        batch = sched.schedule()
        assert not batch.preempted
        for seq in batch.seqs:
            req = seq.request
            if req.scores_prompt:
                req.prompt_logprobs += [{}] * (min(54, req.num_computed + seq.num_tokens + 1) - len(req.prompt_logprobs))
            req.num_computed += seq.num_tokens
            sched.cache_computed(req)
            if seq.appends:
                req.token_ids.append(3)
                sched.remove(req)
                req.status = Status.FINISHED
        if not sched.has_unfinished():
            break
    assert first.finished and scorer.finished and len(scorer.prompt_logprobs) == 54
    assert blocks.num_free + len(sched.cache.cached) == 17        # no block leaked
