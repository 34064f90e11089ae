"""Prefix caching: the radix tree (token-wise matches, splits, copy-on-write, LRU eviction), its refcount
invariants under random scheduling with a simulated KV cache (hypothesis). The engine with caching on and off
is in engine/test_prefix_cache_engine.py."""

import collections

from hypothesis import given, settings, strategies as st

from xyjax import SamplingParams
from xyjax.engine.block_manager import BlockManager
from xyjax.engine.config import EngineConfig
from xyjax.engine.outputs import RequestMetrics
from xyjax.engine.planner import Planner
from xyjax.engine.prefix_cache import PrefixCache
from xyjax.engine.request import Request, Status
from xyjax.engine.batch import Stage
from xyjax.engine.scheduler import Scheduler


def kv_of(tokens, p):
    """What the simulated KV of position ``p`` holds: an id of the prefix tokens[:p + 1]."""
    return hash(tuple(tokens[:p + 1]))


class FakeKV:
    """One value per KV slot, written and copied the way the device cache is."""

    def __init__(self, blocks: BlockManager):
        self.bs, self.slots = blocks.block_size, [[None] * blocks.block_size for _ in range(blocks.num_blocks)]

    def write(self, table, tokens, start, stop):
        for p in range(start, stop):
            self.slots[table[p // self.bs]][p % self.bs] = kv_of(tokens, p)

    def check(self, table, tokens, stop):
        for p in range(stop):
            assert self.slots[table[p // self.bs]][p % self.bs] == kv_of(tokens, p), f"stale KV at position {p}"

    def copy(self, source, destination):
        self.slots[destination] = list(self.slots[source])


def paths(cache: PrefixCache):
    """(node, the tokens of its path from the root up to its end) for every node."""
    stack = [(child, child.tokens) for child in cache.root.children.values()]
    while stack:
        node, path = stack.pop()
        yield node, path
        stack.extend((c, path + c.tokens) for c in node.children.values())


def check_tree(cache: PrefixCache, kv: FakeKV | None = None):
    """Structure, one owner node per cached block, blocks left to children only at a node's last partial block,
    and (with ``kv``) that every owned block holds the KV of its path's positions."""
    bs, owned = cache.block_size, []
    for node, path in paths(cache):
        assert node.tokens and node.start == len(path) - len(node.tokens)
        assert node.start == node.parent.start + len(node.parent.tokens)
        assert node.parent.children[node.tokens[0]] is node
        first, last = node.start // bs, (len(path) - 1) // bs
        left = bool(node.children) and len(path) % bs != 0
        assert len(node.blocks) == last - first + 1 - left
        owned += node.blocks
        for j, block in enumerate(node.blocks, first):
            for p in range(j * bs, min((j + 1) * bs, len(path))) if kv else ():
                assert kv.slots[block][p % bs] == kv_of(path, p), "the tree points at stale KV"
    assert sorted(owned) == sorted(cache.cached)


def check_refcounts(blocks: BlockManager, tables, cache: PrefixCache | None):
    owners = collections.Counter(b for t in tables for b in t)
    if cache:
        owners.update(cache.cached)                    # the cache owns one reference per cached block
    assert all(blocks.refcount[b] == owners[b] for b in range(blocks.num_blocks)), "refcounts disagree with owners"
    free = blocks._free
    assert len(set(free)) == len(free) and not any(owners[b] for b in free), "a free block is referenced"
    assert len(owners) + len(free) == blocks.num_blocks, "a block leaked"


# ---- the tree --------------------------------------------------------------------------------------------

def test_match_is_token_wise_and_a_fork_splits_the_block_it_falls_in():
    blocks = BlockManager(16, 4)
    cache = PrefixCache(blocks)
    a = list(range(10, 20))                                  # 10 tokens: blocks 0, 1 full, block 2 holds 2
    table = []
    blocks.grow(table, len(a))
    cache.insert(a, table)
    assert cache.match(a[:7] + [99]) == (7, table[:2])      # 7 tokens, not rounded down to 4
    assert cache.match(a + [5, 6]) == (10, table)
    assert cache.match([99] + a) == (0, [])
    b = a[:6] + [50, 51, 52, 53]                             # forks inside block 1
    other = []
    blocks.share(other, table[:1])
    blocks.grow(other, len(b))
    cache.insert(b, other)
    assert cache.match(b) == (10, other)                    # the fork's own copy of block 1 wins
    assert cache.match(a[:6]) == (6, table[:2])
    upper = cache.root.children[10]
    assert upper.tokens == a[:6] and set(upper.children) == {a[6], 50}
    assert upper.blocks == table[:1]                          # block 1 is left to the children (each has one)
    assert cache.cached == set(table) | set(other[1:])
    check_tree(cache)
    blocks.free(table)
    blocks.free(other)
    check_refcounts(blocks, [], cache)


def test_eviction_is_lru_over_idle_leaves_and_gives_everything_back():
    blocks = BlockManager(16, 4)
    cache = PrefixCache(blocks)
    tables = {}
    for first in (1, 2, 3):                                  # three disjoint 8-token prompts, 2 blocks each
        tables[first] = []
        blocks.grow(tables[first], 8)
        cache.insert([first] * 8, tables[first])
    cache.match([1] * 8)                                     # 1 is now the most recently used
    for t in tables.values():
        blocks.free(t)
    user = []
    blocks.share(user, cache.match([3] * 8)[1])              # a request holds 3's blocks: 3 is not idle
    assert cache.evict(1) == 2                               # the least recently used idle leaf: 2
    assert cache.match([2] * 8) == (0, []) and cache.match([1] * 8)[0] == 8
    assert cache.evict(100) == 2                             # then 1; 3 stays while the request holds it
    assert cache.match([3] * 8)[0] == 8
    blocks.free(user)
    assert cache.evict(100) == 2 and not cache.cached and blocks.num_free == 16


def test_a_match_inside_a_node_leaves_the_rest_evictable():
    """A request holding the first blocks of a long cached prompt does not pin the rest of it."""
    blocks = BlockManager(8, 4)
    cache = PrefixCache(blocks)
    table = []
    blocks.grow(table, 20)                                   # 5 blocks
    cache.insert(list(range(20)), table)
    blocks.free(table)
    user = []
    blocks.share(user, cache.match(list(range(8)) + [99])[1])
    assert cache.evict(8) == 3 and cache.match(list(range(20)))[0] == 8
    check_tree(cache)
    blocks.free(user)
    check_refcounts(blocks, [], cache)


def make_request(i, prompt, max_tokens=4, scores=False):
    req = Request(request_id=str(i), prompt=None, prompt_token_ids=prompt, seed=0, arrival=i,
                  params=SamplingParams(max_tokens=max_tokens, prompt_logprobs=0 if scores else None),
                  metrics=RequestMetrics(arrival_time=0.0))
    req.prompt_logprobs = [None] if scores else None
    return req


def test_admission_takes_the_cached_prefix_and_charges_only_the_rest():
    """A 7-token hit: the budget pays for uncached tokens only, the partial block is copied, and the planner
    runs the chunk from position 7 (kv_len = 7 + q_len)."""
    blocks = BlockManager(32, 4)
    config = EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4)
    sched = Scheduler(config, blocks, PrefixCache(blocks))
    first = make_request(0, list(range(1, 11)))
    sched.add(first)
    sched.schedule()
    first.num_computed = 10
    sched.cache_computed(first)
    second = make_request(1, list(range(1, 8)) + [50] * 20)
    sched.add(second)
    batch = sched.schedule()
    assert [(s.request, s.num_tokens) for s in batch.seqs] == [(second, 16)] and second.num_computed == 7
    assert second.block_table[0] == first.block_table[0] and batch.copies == [(first.block_table[1],
                                                                               second.block_table[1])]
    inputs, _ = Planner(config, 128, 2, 1000).plan(batch)
    assert inputs.positions[:16].tolist() == list(range(7, 23))
    stats = sched.stats.snapshot()
    assert {k: v for k, v in stats.items() if k.startswith("prefix_") and k != "prefix_cache_hit_rate"} == dict(
        prefix_lookups=2, prefix_lookup_tokens=37, prefix_hit_tokens=7, prefix_block_hit_tokens=4, prefix_copies=1,
        prefix_evicted_blocks=0)


# ---- random scheduling with a simulated KV cache -----------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(stems=st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=30), min_size=1, max_size=3),
       requests=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30), st.lists(st.integers(1, 4), max_size=8),
                                   st.integers(1, 16), st.integers(0, 4), st.booleans()), min_size=1, max_size=10),
       evictions=st.lists(st.integers(0, 3), min_size=8, max_size=8),
       num_blocks=st.integers(10, 30), budget=st.sampled_from([8, 16, 32]), max_num_seqs=st.integers(1, 4))
def test_random_scheduling_keeps_tree_refcounts_and_kv_consistent(stems, requests, evictions, num_blocks, budget,
                                                                 max_num_seqs):
    """Requests built from a few shared stems (forks at any token) arrive over time through the scheduler with
    the prefix cache on a short pool (evictions, preemptions, copy-on-write), plus random extra evictions; a fake
    model writes a value per (prefix, position) into a simulated KV cache. Every step: each scheduled request
    sees the right KV for all its computed tokens, the tree only points at right KV, refcounts equal the owners
    (request tables + the cache), no free block is referenced; rejected speculative drafts leave dead KV behind
    without harm. Requests scoring their prompt compute cached prefixes again, and the cache takes their copies.
    At the end, after evicting all, nothing leaked."""
    bs = 4
    blocks = BlockManager(num_blocks, bs)
    cache = PrefixCache(blocks)
    config = EngineConfig(block_size=bs, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_draft_tokens=1)
    sched = Scheduler(config, blocks, cache)
    kv = FakeKV(blocks)
    max_len = num_blocks * bs
    pending = []
    for i, (stem, cut, tail, max_tokens, arrival, scores) in enumerate(requests):
        stem = stems[stem % len(stems)]
        prompt = (stem[:cut] + tail)[:max_len - max_tokens - 1] or [1]
        pending.append((arrival, make_request(i, prompt, max_tokens, scores)))
    pending.sort(key=lambda x: (x[0], x[1].arrival))
    finished, step = 0, 0
    while pending or sched.has_unfinished():
        while pending and pending[0][0] <= step:
            sched.add(pending.pop(0)[1])
        cache.evict(evictions[step % len(evictions)])
        batch = sched.schedule()
        step += 1
        assert step < 2000, "no progress"
        assert batch.num_tokens <= budget
        for source, destination in batch.copies:
            kv.copy(source, destination)
        for seq in batch.seqs:
            req, sampled = seq.request, seq.num_samples
            kv.check(req.block_table, req.token_ids, req.num_computed)
            kv.write(req.block_table, req.token_ids + req.draft_token_ids, req.num_computed,
                     req.num_computed + seq.num_tokens)
            if req.scores_prompt and seq.stage is Stage.PREFILL:
                scored = min(len(req.prompt_token_ids), req.num_computed + seq.num_tokens + 1)
                req.prompt_logprobs += [{}] * (scored - len(req.prompt_logprobs))
            req.num_computed += seq.num_tokens
            if seq.stage is Stage.VERIFY:                  # the draft is rejected: its KV is dead
                req.num_computed -= len(req.draft_token_ids)
                req.draft_token_ids = []
            if seq.stage is Stage.PREFILL:
                sched.cache_computed(req)
            if sampled:
                req.token_ids.append(1 + len(req.token_ids) % 3)
                if len(req.output_ids) >= req.params.max_tokens:
                    sched.remove(req)
                    req.status = Status.FINISHED
                    finished += 1
                elif step % 2:
                    req.draft_token_ids = [2]
        check_tree(cache, kv)
        check_refcounts(blocks, [r.block_table for r in sched.running + list(sched.waiting)], cache)
        assert all(not r.block_table for r in sched.waiting)
    assert finished == len(requests)
    stats = sched.stats.snapshot()
    if stats["prefix_lookups"]:                            # requests scoring their prompt look nothing up
        assert stats["prefix_block_hit_tokens"] <= stats["prefix_hit_tokens"] < stats["prefix_lookup_tokens"]
    cache.evict(num_blocks)
    assert not cache.cached and blocks.num_free == num_blocks
