"""Speculative decoding: drafters, adaptive control, acceptance, tree masks and KV moves against float64,
greedy exactness over random workloads (chain and tree), rejection sampling's distribution (chi-square)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from helpers import TINY, dense_meta, drive, reference_attention, reference_greedy, reference_logits

from models.llama import init_params
from models.loader import LoadedModel
from xyjax import LLM, SamplingParams
from xyjax.engine.drafters import DraftTree, NgramDrafter
from xyjax.ops.kv_cache import KVCache
from xyjax.ops import meta_attention
from xyjax.engine.speculative import AdaptiveControl, SpecConfig, accepted_path, kv_moves
from xyjax.ops.attention.tiling import attention_metadata

# Chi-square tests below reject at this significance level (fixed seeds: deterministic outcomes).
ALPHA = 0.01


# ---- drafters and control -------------------------------------------------------------------------
def test_ngram_chain_takes_the_most_recent_longest_match():
    d = NgramDrafter(min_n=1, max_n=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3], 3) == DraftTree.chain([4, 5, 9])   # n=3 beats n=2
    assert d.propose([5, 1, 8, 1, 6, 1], 2).tokens == [6, 1]                                 # most recent n=1
    assert d.propose([1, 2, 3], 4).tokens == [] and d.propose([1, 2, 1], 0).tokens == []
    assert NgramDrafter(min_n=2, max_n=2).propose([7, 1, 8, 1], 2).tokens == []             # n=1 not searched


def test_ngram_tree_merges_continuations_within_the_node_budget():
    d = NgramDrafter(min_n=1, max_n=2, tree=True, max_matches=3)
    ids = [1, 2, 3, 9, 1, 2, 4, 7, 1, 2, 3, 5, 1, 2]
    tree = d.propose(ids, 6)
    # continuations after "1 2": [3 5 ..] (newest), [4 7 ..], [3 9 ..], each cut to 6 - 2 * 2 = 2 tokens
    assert tree.tokens == [3, 5, 4, 7, 9] and tree.parents == [-1, 0, -1, 2, 0]
    assert tree.depths() == [1, 2, 1, 2, 2] and not tree.is_chain
    full = d.propose(ids, 20)
    assert len(full.tokens) == 20 and full.tokens[12:14] == [9, 1] and full.parents[12] == 0   # budget filled
    siblings = {}
    for p, t in zip(full.parents, full.tokens):
        assert t not in siblings.setdefault(p, set())
        siblings[p].add(t)


def test_adaptive_control_follows_accepted_length_pauses_and_reprobes():
    c = AdaptiveControl(ema=8)
    assert c.budget(8) == 8
    c.update(8, 0)
    c.update(8, 2)
    assert c.budget(8) == 5                    # ema 8 -> 4 -> 3: ceil + slack 2
    budgets = []
    while not c.paused:
        budgets.append(c.budget(8))
        c.update(budgets[-1], 0)
    assert budgets == [5, 4, 3, 3] and c.paused == 8 == c.pause                  # ema 1.5, 0.75, 0.375, 0.19
    assert [c.budget(8) for _ in range(8)] == [0] * 8 and c.budget(8) == 3      # re-probe with 3 drafts
    c.update(3, 0)
    assert c.pause == c.paused == 16                                             # failed probe: longer pause
    c.paused = 0
    c.update(3, 2)
    assert c.pause == 0 and c.budget(8) == 4
    assert AdaptiveControl(ema=3, slack=1).budget(8) == 4


def test_accepted_path_and_kv_moves():
    tree = DraftTree([3, 5, 4, 7], [-1, 0, -1, 2])        # root -> 3 -> 5, root -> 4 -> 7; rows 1..4
    assert accepted_path(tree, [4, 0, 0, 7, 9]) == [0, 3, 4]
    assert accepted_path(tree, [3, 5, 8, 0, 0]) == [0, 1, 2]
    assert accepted_path(tree, [6, 5, 8, 0, 0]) == [0]
    assert kv_moves([0, 3, 4], 10, lambda p: 100 + p) == [(113, 111), (114, 112)]
    assert kv_moves([0, 1, 2], 10, lambda p: p) == []


def test_spec_config_is_checked():
    assert SpecConfig.parse(None) is None
    assert SpecConfig.parse({"num_draft_tokens": 3, "tree": True}).tree
    for bad in ({"method": "eagle"}, {"num_draft_tokens": 0}, {"k": 3}, "ngram"):
        with pytest.raises(ValueError):
            SpecConfig.parse(bad)


# ---- tree masks and KV moves against float64 ------------------------------------------------------
@pytest.mark.parametrize("backend", ["xla", "ffi"])
def test_tree_verify_and_moved_kv_match_float64(backend):
    """Tree rows see the history and their ancestors only; after the accepted path's KV is moved to the
    next contiguous positions, a causal decode over them equals attention over the path itself."""
    rng = np.random.default_rng(0)
    heads, kv_heads, dim, bs, history = 4, 2, 16, 4, 9
    tree = DraftTree([3, 5, 4, 7, 8], [-1, 0, -1, 2, 2])
    parents = [-1] + [p + 1 for p in tree.parents]        # rows: root then nodes
    n, T = len(parents), 16
    table = rng.permutation(16)[None].astype(np.int32)   # 16 shuffled blocks
    k = rng.standard_normal((1, 16, kv_heads, bs, dim)).astype(np.float32)
    v = rng.standard_normal((1, 16, kv_heads, bs, dim)).astype(np.float32)
    q = np.zeros((T, heads, dim), np.float32)
    q[:n] = rng.standard_normal((n, heads, dim))
    meta = attention_metadata([0], [n], [history + n], table, num_kv_heads=kv_heads, tile=4, num_tokens=T,
                              block_size=bs, trees={0: parents}, max_tree=8)
    meta = jax.tree.map(jnp.asarray, meta)
    kv = KVCache(k=jnp.asarray(k), v=jnp.asarray(v))
    out = np.asarray(meta_attention(jnp.asarray(q), kv, 0, meta, backend=backend))
    slot = lambda p: int(table[0, p // bs]) * bs + p % bs                               # noqa: E731
    ancestors = np.zeros((n, n), bool)                    # row j: j and its ancestors
    for row in range(n):
        r = row
        while r >= 0:
            ancestors[row, r] = True
            r = parents[r]
    ref = reference_attention(q, kv, 0, dense_meta(table, [(0, 0, n, history, ancestors)], kv_heads, T=T))
    for row in range(n):
        np.testing.assert_allclose(out[row], ref[row], atol=2e-5)
    path = accepted_path(tree, [4, 0, 0, 8, 0, 0])           # root -> 4 (row 3) -> 8 (row 5)
    moved = kv.move(jnp.asarray(kv_moves(path, history, slot) + [(-1, -1)] * 3, jnp.int32))
    pos = list(range(history + len(path)))
    decode = jax.tree.map(jnp.asarray, attention_metadata([0], [1], [len(pos)], table, num_kv_heads=kv_heads,
                                                          num_tokens=T, block_size=bs))
    got = np.asarray(meta_attention(jnp.asarray(q), moved, 0, decode, backend=backend))[0]
    on_path = np.isin(np.arange(n), path)[None]           # the decode row sees the history and the path's rows
    ref = reference_attention(q, kv, 0, dense_meta(table, [(0, 0, 1, history, on_path)], kv_heads, T=T))
    np.testing.assert_allclose(got, ref[0], atol=2e-5)


# ---- the engine: greedy exactness, no leaks, no compiles --------------------------------------------
def spec_llm(model, tree, **kw):
    per_block = 4 * 2 * 2 * 2 * 16 * 4     # tiny model, block_size 4
    options = dict(block_size=4, kv_cache_memory=48 * per_block, max_num_batched_tokens=32, max_num_seqs=5,
                   attention_lanes=2, min_split_kv=8, progress=False)
    return LLM(model, speculative={"num_draft_tokens": 4, "tree": tree, "min_n": 1, "max_n": 3}, **(options | kw))


def small_model(tokenizer, vocab, seed, scale):
    """A 2-layer random model over a vocabulary of ``vocab`` ids: its greedy text soon loops (drafts hit)."""
    cfg = dataclasses.replace(TINY, vocab_size=vocab)
    return LoadedModel(name=f"small{vocab}", config=cfg, params=init_params(cfg, jax.random.key(seed), scale=scale),
                       tokenizer=tokenizer, dtype=jnp.dtype("float32"))


@pytest.fixture(scope="module")
def loopy_model(tokenizer):
    return small_model(tokenizer, 24, 1, 0.2)


@pytest.fixture(scope="module", params=[False, True], ids=["chain", "tree"])
def llm(request, loopy_model):
    return spec_llm(loopy_model, request.param)


workloads = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 16), st.integers(0, 6), st.booleans()),
                     min_size=1, max_size=6)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workload=workloads, seed=st.integers(0, 2**16))
def test_greedy_with_speculation_equals_reference(llm, loopy_model, workload, seed):
    """Random prompts arriving over time, speculating and ordinary (SamplingParams.speculative=False)
    requests mixed, a short KV pool (preemption): greedy tokens equal the one-request reference token for
    token; every KV block comes back; no program is compiled."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 24, w[0]).tolist() for w in workload]
    sampling = [SamplingParams(max_tokens=w[1], temperature=0, ignore_eos=True, speculative=w[3]) for w in workload]
    compiles = llm.stats["compiles"]
    results = drive(llm.engine, [w[2] for w in workload], prompts, sampling)
    for p, s, (tokens, reason) in zip(prompts, sampling, results):
        assert reason == "length" and tokens == reference_greedy(loopy_model, p, s.max_tokens)
    assert llm.stats["compiles"] == compiles
    assert llm.stats["kv_blocks_free"] == llm.stats["kv_blocks_total"]


def test_drafts_hit_and_stats(llm):
    before = llm.stats
    out = llm.generate([[1, 2, 3, 4] * 6], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    s = llm.stats
    drafted = s["spec_drafted_tokens"] - before["spec_drafted_tokens"]
    accepted = s["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert out.metrics.num_draft_tokens == drafted > 0 and out.metrics.num_accepted_tokens == accepted
    assert accepted > 0 and 0 < s["spec_acceptance_rate"] <= 1 and s["spec_mean_accepted_length"] > 1


def test_tree_paths_off_the_first_branch_are_moved_into_place(llm, loopy_model, monkeypatch):
    """Accepted tree nodes whose KV sits past their position are copied there, greedy stays exact, and
    nothing (step or move program) is compiled while serving."""
    moved, compiled = [], []
    move = llm.engine.runner.move_slots
    monkeypatch.setattr(llm.engine.runner, "move_slots", lambda moves: (moved.extend(moves), move(moves)))
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiled.append(kw.get("fun_name")) if event.endswith("backend_compile_duration")
        else None)
    prompts = np.random.default_rng(5).integers(0, 24, (5, 12)).tolist()
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True), progress=False)
    assert compiled == []
    assert [o.token_ids for o in outs] == [reference_greedy(loopy_model, p, 40) for p in prompts]
    assert bool(moved) == (llm.engine.drafter.tree)


def test_a_finished_request_caches_its_accepted_kv(llm, loopy_model):
    """A request that ends right after a verify run hands its prefix to the prefix cache; a later request
    extending that text reuses the KV of the accepted drafts (a tree's moved into place), and its greedy
    tokens still equal the reference."""
    prompt = np.random.default_rng(5).integers(0, 24, (3, 10)).tolist()[1]        # its greedy text loops
    first = llm.generate([prompt], SamplingParams(max_tokens=21, temperature=0, ignore_eos=True))[0]
    assert first.metrics.num_accepted_tokens > 0
    hits = llm.stats["prefix_hit_tokens"]
    longer = prompt + first.token_ids
    second = llm.generate([longer], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))[0]
    assert llm.stats["prefix_hit_tokens"] - hits > len(prompt)
    assert second.token_ids == reference_greedy(loopy_model, longer, 6)


def test_seeded_sampling_is_the_same_with_and_without_speculation(llm, loopy_model):
    """Verify rows draw with plain decoding's keys, so a seeded request's tokens do not change."""
    plain = LLM(loopy_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=5, progress=False)
    prompts = np.random.default_rng(5).integers(0, 24, (3, 10)).tolist()
    sampling = [SamplingParams(max_tokens=40, temperature=t, top_k=k, seed=1, ignore_eos=True, logprobs=1)
                for t, k in [(1.0, 0), (0.2, 0), (0.2, 50)]]
    before = llm.stats["spec_accepted_tokens"]
    a = llm.generate(prompts, sampling, progress=False)
    b = plain.generate(prompts, sampling, progress=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b] and llm.stats["spec_accepted_tokens"] > before
    for x, y in zip(a, b):
        for ex, ey in zip(x.logprobs, y.logprobs):
            assert ex.keys() == ey.keys() and np.allclose(list(ex.values()), list(ey.values()), atol=1e-4)


# ---- rejection sampling's distribution ------------------------------------------------------------
def chi_square_p(counts, probs):
    """p-value of Pearson's chi-square goodness of fit (cells with expected < 5 merged into one)."""
    from scipy.stats import chi2

    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    return chi2.sf(stat, keep.sum() - 1)


def test_logprobs_on_a_vocabulary_smaller_than_max_logprobs(tokenizer):
    """max_logprobs (default 20) is capped at the vocabulary: 6 logprobs of a 6-token model are served, 7 refused."""
    llm = LLM(small_model(tokenizer, 6, 3, 0.5), block_size=4, max_num_batched_tokens=64, max_num_seqs=4,
              progress=False)
    out, bad = llm.generate([[1, 2, 3], [1, 2]], [SamplingParams(max_tokens=3, logprobs=6, ignore_eos=True),
                                                  SamplingParams(max_tokens=3, logprobs=7)], progress=False)
    assert len(out.token_ids) == 3 and all(len(step) == 6 for step in out.logprobs)
    assert bad.finish_reason == "error" and "max_logprobs=6" in bad.error


def test_stochastic_speculation_matches_the_model_distribution(tokenizer):
    """A 6-token model sampled at temperature 1 with chain and tree speculation (seeds 0..N-1): the joint
    distribution of output tokens 2 and 3 (drawn in verify runs) fits the exact one computed from float32
    reference logits (chi-square, ALPHA)."""
    model = small_model(tokenizer, 6, 3, 0.5)
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]

    def soft(ids):
        logits = reference_logits(model.config, model.params, ids).astype(np.float64)
        e = np.exp(logits - logits.max())
        return e / e.sum()
    first = soft(prompt)
    N = 1500
    for tree in (False, True):
        llm = LLM(model, block_size=4, max_num_batched_tokens=256, max_num_seqs=32, max_logprobs=4, progress=False,
                  speculative={"num_draft_tokens": 3, "tree": tree, "adaptive": False})
        outs = llm.generate([prompt] * N, [SamplingParams(max_tokens=4, temperature=1.0, seed=i, ignore_eos=True)
                                           for i in range(N)], progress=False)
        assert llm.stats["spec_accepted_tokens"] > 0
        t0 = np.array([o.token_ids[0] for o in outs])
        for t in range(6):                    # condition on the first token (sampled in the prefill)
            sub = [o.token_ids[1:3] for o, f in zip(outs, t0) if f == t]
            if len(sub) < 100:
                continue
            second = soft(prompt + [t])
            joint = np.array([second[a] * soft(prompt + [t, a])[b] for a in range(6) for b in range(6)])
            counts = np.bincount([a * 6 + b for a, b in sub], minlength=36)
            assert chi_square_p(counts, joint) > ALPHA
        assert chi_square_p(np.bincount(t0, minlength=6), first) > ALPHA


def test_bench_spec_compares_back_to_back(llm, loopy_model, tokenizer):
    """The benchmark's comparison on a tiny model: same tokens both ways, counters of the spec run only."""
    from xyjax.bench.spec import compare, passages

    assert len(passages(3)) == 3 and all(passages(3))
    plain = LLM(loopy_model, block_size=4, max_num_batched_tokens=32, max_num_seqs=5, progress=False)
    prompts = np.random.default_rng(5).integers(0, 24, (3, 10)).tolist()
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    r = compare(plain, llm, [(prompts[:1], [greedy]), (prompts[1:], [greedy] * 2)])
    assert r["identical"] and r["tokens"] == 60 and r["drafted"] > 0 and 0 < r["acceptance_rate"] <= 1
    assert r["speedup"] > 0 and r["mean_accepted_length"] >= 1
