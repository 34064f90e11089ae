"""Shared test builders (import as ``helpers``; tests/ is on sys.path through pytest's ``pythonpath``).

- the tiny random model's config (TINY) and its synthetic byte-level BPE tokenizer (no download);
- the model-level reference: ``reference_logits`` / ``reference_prompt_logprobs`` / ``reference_greedy``
  (models.llama.forward on one contiguous sequence, no engine, no paging);
- THE float64 attention reference, ``reference_attention``, straight from the tile contract (CAUSAL and TREE
  masks, KV splits by task table, GQA), and the builders of attention cases that every attention test uses;
- ``drive``: runs an Engine over requests arriving at given steps; ``start_server``: a live `xyjax serve`."""

import collections
import dataclasses
import functools
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from models.config import ModelConfig
from models.llama import forward, init_params
from models.loader import LoadedModel
from models.tokenizer import IncrementalDetokenizer, Tokenizer, bytes_to_unicode
from xyjax.ops import AttentionMetadata, TaskTable, meta_attention
from xyjax.ops.attention.contract import NUM_FIELDS, Field, MaskKind
from xyjax.ops.attention.tiling import attention_metadata
from xyjax.ops.kv_cache import KVCache
from xyjax.ops.step_inputs import StepInputs

# ---- the tiny random model and its synthetic tokenizer ----------------------------------------------------
TINY = ModelConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                   max_position_embeddings=256, tie_word_embeddings=True)

CORPUS = """The quick brown fox jumps over the lazy dog. Hello there! Hello world, how are you today?
The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father had.
Once upon a time, in a land far away, there lived a king and a queen who had three daughters.
What is the capital of France? Paris is the capital and largest city of France.
Write a short poem about the sea. You are a helpful assistant. Tell me a story about a dragon.
def main(): return 0  # numbers 0 1 2 3 4 5 6 7 8 9 10 100 2024 and symbols ( ) [ ] { } < > = + - * / , . ; : ! ?
système café naïve über 日本語 中文 emoji 🙂 ✓ — “quotes” ‘single’ …"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")
WORD = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\w+| ?\d+| ?[^\s\w\d]+|\s+(?!\S)|\s+""")

@functools.lru_cache(maxsize=None)
def tiny_tokenizer_fields(vocab_size: int = 49152, num_merges: int = 400) -> dict:
    """GGUF tokenizer metadata of a small byte-level BPE (GPT-2 style, like the default model's): the three
    ChatML specials (EOS <|endoftext|>... as SmolLM2: ids 0-2, BOS 1, EOS 2), the 256 byte tokens, merges learnt
    greedily on CORPUS, then filler tokens ``<xN>`` up to ``vocab_size`` so every id of the tiny model decodes."""
    spell = bytes_to_unicode()
    words = collections.Counter(tuple(spell[b] for b in w.encode()) for w in WORD.findall(CORPUS))
    tokens = SPECIALS + [spell[b] for b in range(256)]
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new[tuple(out)] += n
        words = new
    tokens += [f"<x{i}>" for i in range(vocab_size - len(tokens))]
    return {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.padding_token_id": 2,
            "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE}



def tiny_tokenizer() -> Tokenizer:
    """A fresh Tokenizer over ``tiny_tokenizer_fields()`` (built as a GGUF file's would be)."""
    return Tokenizer.from_gguf(tiny_tokenizer_fields())


def tiny_model(tokenizer: Tokenizer | None = None) -> LoadedModel:
    """A 2-layer random-weight Llama (TINY, seed 0; outputs are gibberish) with the synthetic tokenizer."""
    params = init_params(TINY, jax.random.key(0), scale=0.2)
    return LoadedModel(name="tiny", config=TINY, params=params, tokenizer=tokenizer or tiny_tokenizer(),
                       dtype=jnp.dtype("float32"))


# ---- the model-level reference: models.llama.forward on one contiguous sequence --------------------------
@functools.lru_cache(maxsize=None)
def _step(cfg):
    return jax.jit(functools.partial(forward, cfg=cfg))


def reference_logits(cfg, params, ids: list[int]) -> np.ndarray:
    """float32 logits [V] after the whole of ``ids``, computed in one pass from an empty contiguous cache."""
    return _reference_pass(cfg, params, ids, [len(ids) - 1])[0]


def reference_prompt_logprobs(cfg, params, ids: list[int]) -> np.ndarray:
    """float32 log-softmax [len(ids), V] after each prefix of ``ids``, from one pass over the whole of it."""
    return np.asarray(jax.nn.log_softmax(_reference_pass(cfg, params, ids, range(len(ids))), axis=-1))


def _reference_pass(cfg, params, ids: list[int], rows) -> np.ndarray:
    L, rows = len(ids), list(rows)
    T = max(128, 1 << (L - 1).bit_length())
    kv = KVCache.create(cfg.num_layers, T // 16, 16, cfg.num_kv_heads, cfg.head_dim)
    pad = lambda a, fill: np.concatenate([a, np.full(T - L, fill)]).astype(np.int32)  # noqa: E731
    meta = attention_metadata([0], [L], [L], np.arange(T // 16)[None], num_kv_heads=cfg.num_kv_heads, num_tokens=T)
    inputs = StepInputs(token_ids=pad(np.array(ids), 0), positions=pad(np.arange(L), 0),
                        slot_mapping=pad(np.arange(L), -1), num_tokens=jnp.int32(L), attention=meta,
                        sample_index=jnp.array(rows, jnp.int32), num_samples=jnp.int32(len(rows)))
    logits, _ = _step(cfg)(params, kv, inputs)
    return np.asarray(logits[:len(rows)])


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation of ``prompt`` recomputing the whole sequence for every token."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(reference_logits(model.config, model.params, ids))))
    return ids[len(prompt):]


def greedy_mismatches(model, prompt: list[int], tokens: list[int], tol: float = 1e-4) -> list[tuple]:
    """Where ``tokens`` (a greedy continuation of ``prompt`` by the engine) is not an argmax of the reference
    logits along its own path, up to ``tol``: ties within float32 noise (random weights make near-ties) may go
    either way. [] when every token is a greedy choice."""
    bad = []
    for i, token in enumerate(tokens):
        logits = reference_logits(model.config, model.params, list(prompt) + list(tokens[:i]))
        if logits[token] < logits.max() - tol:
            bad.append((i, token, int(logits.argmax()), float(logits.max() - logits[token])))
    return bad


# ---- the float64 attention reference ---------------------------------------------------------------------
attention = jax.jit(meta_attention, static_argnames="backend")


def reference_attention(q, kv, layer, meta, scale=None):
    """float64 attention straight from the tile contract (rows >= num_tasks of each group ignored): the positions
    a (row, head) sees are the union over its tasks (its KV splits, in any group) of the positions in
    [kv_start, kv_end) its mask shows it (CAUSAL: up to q_pos + i; TREE: history before mask_base, then the row's
    tree-mask bits, none where ``meta.tree_mask`` is None); GQA through kv_head; softmax over that union, zeros
    where it is empty. ``kv``: a KVCache (or anything with .k/.v [L, NB, Hkv, BS, D]); ``meta``: an
    AttentionMetadata (see ``task_meta`` for a hand-written table)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, kv.k, kv.v))
    tables = np.asarray(meta.block_tables)
    tree = None if meta.tree_mask is None else np.asarray(meta.tree_mask)
    _, num_heads, dim = q.shape
    group, block_size = num_heads // k.shape[2], k.shape[3]
    scale = dim ** -0.5 if scale is None else scale
    seen = {}   # (row, kv_head) -> (seq, set of positions)
    for g in meta.groups:
        for t in np.asarray(g.tasks)[:int(g.num_tasks)]:
            for i in range(t[Field.Q_LEN]):
                row, pos = t[Field.Q_START] + i, np.arange(t[Field.KV_START], t[Field.KV_END])
                if t[Field.MASK_KIND] == MaskKind.CAUSAL:
                    pos = pos[pos <= t[Field.Q_POS] + i]
                else:
                    col, width = pos - t[Field.MASK_BASE], 0 if tree is None else tree.shape[1]
                    bit = (col >= 0) & (col < width) & (tree[row, np.clip(col, 0, max(width - 1, 0))] != 0
                                                        if width else False)
                    pos = pos[(col < 0) | bit]
                seen.setdefault((row, t[Field.KV_HEAD]), (t[Field.SEQ], set()))[1].update(pos.tolist())
    out = np.zeros(q.shape)
    for (row, head), (seq, positions) in seen.items():
        if not positions:
            continue
        pos = np.array(sorted(positions))
        blocks, offsets = tables[seq, pos // block_size], pos % block_size
        keys, values = k[layer, blocks, head, offsets], v[layer, blocks, head, offsets]
        for h in range(head * group, (head + 1) * group):
            s = keys @ q[row, h] * scale
            p = np.exp(s - s.max())
            out[row, h] = p @ values / p.sum()
    return out


def task_meta(block_tables, tasks, *, tile=8, tree_mask=None, num_tasks=None) -> AttentionMetadata:
    """One group holding the task table ``tasks`` ([W, NUM_FIELDS], or rows of up to NUM_FIELDS fields; a short
    row gets NUM_SPLITS 1) as AttentionMetadata, ``num_tasks`` real rows (default: all)."""
    table = np.zeros((len(tasks), NUM_FIELDS), np.int32)
    for i, r in enumerate(tasks):
        table[i, :len(r)] = r
        if len(r) < NUM_FIELDS:
            table[i, Field.NUM_SPLITS] = 1
    n = len(tasks) if num_tasks is None else num_tasks
    return AttentionMetadata(block_tables=np.asarray(block_tables), groups=(TaskTable(table, np.int32(n), tile),),
                             tree_mask=None if tree_mask is None else np.asarray(tree_mask))


def dense_meta(block_tables, seqs, kv_heads, *, T=None) -> AttentionMetadata:
    """The plainest table of a batch, independent of xyjax's tiling: one unsplit task per (sequence, KV head)
    over the sequence's whole KV. ``seqs``: (seq, q_start, q_len, history, tree) with ``tree`` None (CAUSAL rows
    at positions history..history + q_len) or a [q_len, W] mask (TREE rows over the history, then the bits of
    the W positions history..history + W: e.g. a [q_len, q_len] ancestor mask of draft tokens)."""
    rows, width = [], max([np.shape(s[4])[1] for s in seqs if s[4] is not None] or [1])
    T = T or max(s[1] + s[2] for s in seqs)
    mask = np.zeros((T, width), np.uint8)
    for seq, q_start, n, history, tree in seqs:
        if tree is not None:
            mask[q_start:q_start + n, :np.shape(tree)[1]] = tree
        kv_end = history + (n if tree is None else np.shape(tree)[1])
        for head in range(kv_heads):
            rows.append((seq, q_start, n, history, 0, kv_end, head,
                         MaskKind.CAUSAL if tree is None else MaskKind.TREE, 0 if tree is None else history, 0, 1))
    return task_meta(block_tables, rows, tree_mask=mask)


# ---- attention cases ------------------------------------------------------------------------------------
def paged_batch(rng, q_lens, kv_lens, *, layers, heads, kv_heads, dim, block_size, T, S, pages, num_blocks):
    """Random q [T, H, D] and paged k/v [layers, NB, Hkv, BS, D] with each sequence's KV in shuffled blocks, at
    fixed (bucket) shapes; per-sequence q_start, q_len, kv_len [S] and block tables [S, pages] (numpy)."""
    assert sum(q_lens) <= T and len(q_lens) <= S and max(kv_lens) <= pages * block_size
    assert sum(-(-n // block_size) for n in kv_lens) <= num_blocks
    order = rng.permutation(num_blocks)
    k = rng.standard_normal((layers, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    v = rng.standard_normal((layers, num_blocks, kv_heads, block_size, dim)).astype(np.float32)
    q = rng.standard_normal((T, heads, dim)).astype(np.float32)
    tables = np.zeros((S, pages), np.int32)
    q_start, q_len, kv_len = (np.zeros(S, np.int32) for _ in range(3))
    row, used = 0, 0
    for i, (n, total) in enumerate(zip(q_lens, kv_lens)):
        nb = -(-total // block_size)
        tables[i, :nb] = order[used:used + nb]
        used += nb
        q_start[i], q_len[i], kv_len[i] = row, n, total
        row += n
    return q, k, v, q_start, q_len, kv_len, tables


def ragged_case(rng, q_lens, histories, heads=4, kv_heads=2, dim=16, block_size=4, T=64, S=8, pages=8, num_blocks=64,
                tile=4):
    """Random cache with each sequence's KV in shuffled blocks, padded to fixed (bucket) shapes so one
    compiled program serves every case; returns the op inputs and the float64 reference of layer 1."""
    kv_lens = [q + h for q, h in zip(q_lens, histories)]
    q, k, v, q_start, q_len, kv_len, tables = paged_batch(
        rng, q_lens, kv_lens, layers=2, heads=heads, kv_heads=kv_heads, dim=dim, block_size=block_size, T=T, S=S,
        pages=pages, num_blocks=num_blocks)
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=kv_heads, tile=tile, num_tokens=T)
    kv = KVCache(k=jnp.asarray(k), v=jnp.asarray(v))
    seqs = [(i, q_start[i], n, total - n, None) for i, (n, total) in enumerate(zip(q_lens, kv_lens))]
    dense = dense_meta(tables, seqs, kv_heads)
    return jnp.asarray(q), kv, meta, reference_attention(q, kv, 1, dense)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes of a family of cases (one compiled program each)."""

    heads: int = 4
    kv_heads: int = 2
    dim: int = 16
    block_size: int = 16
    T: int = 64
    S: int = 6
    pages: int = 24
    num_blocks: int = 128
    tile: int = 8
    tree_cols: int = 8            # MT, the tree mask's columns
    capacity: tuple = (48, 96)    # task-table rows of the decode (tile 1) and chunk groups


def random_tree(rng, n):
    """[n, n] bool: row j marks node j and its ancestors in a random tree over nodes in topological order."""
    mask = np.eye(n, dtype=bool)
    for j in range(1, n):
        mask[j] |= mask[rng.integers(0, j)]
    return mask


def contract_case(rng, seqs, shapes: Shapes = Shapes(), *, with_mask=True):
    """A batch built straight in the tile contract. ``seqs``: (q_len, history, num_splits, tree) per sequence;
    tree False: CAUSAL rows (1-row tiles for a decode, ``tile`` rows otherwise); tree True: q_len tree tokens
    verified over the history (TREE tasks, a random tree, KV range [0, history + q_len) so only the mask
    decides). Each tile x KV head is cut into up to num_splits KV splits at random block boundaries; the task
    order is shuffled within each group. Returns q, kv, meta and the float64 dense reference (each sequence's
    rows against its whole KV under the same per-row mask)."""
    sh = shapes
    k = rng.standard_normal((2, sh.num_blocks, sh.kv_heads, sh.block_size, sh.dim)).astype(np.float32)
    v = rng.standard_normal((2, sh.num_blocks, sh.kv_heads, sh.block_size, sh.dim)).astype(np.float32)
    q = rng.standard_normal((sh.T, sh.heads, sh.dim)).astype(np.float32)
    tables = np.zeros((sh.S, sh.pages), np.int32)
    tree_mask = np.zeros((sh.T, sh.tree_cols), np.uint8)
    order = rng.permutation(sh.num_blocks)
    groups, dense = ([], []), []
    row = used = 0
    for seq, (n, history, num_splits, tree) in enumerate(seqs):
        total = history + n
        nb = -(-total // sh.block_size)
        assert row + n <= sh.T and seq < sh.S and nb <= sh.pages and (not tree or n <= sh.tree_cols)
        tables[seq, :nb] = order[used:used + nb]
        used += nb
        if tree:
            bits = random_tree(rng, n)
            tree_mask[row:row + n, :n] = bits
        dense.append((seq, row, n, history, bits if tree else None))
        size = 1 if n == 1 else sh.tile
        for off in range(0, n, size):
            m = min(size, n - off)
            kv_end = total if tree else history + off + m
            cuts = np.arange(sh.block_size, kv_end, sh.block_size)
            cuts = np.sort(rng.choice(cuts, min(num_splits - 1, len(cuts)), replace=False))
            bounds = [0, *cuts.tolist(), kv_end]
            for head in range(sh.kv_heads):
                for split in range(len(bounds) - 1):
                    groups[size > 1].append(
                        (seq, row + off, m, history + off, bounds[split], bounds[split + 1], head,
                         MaskKind.TREE if tree else MaskKind.CAUSAL, history if tree else 0, split, len(bounds) - 1))
        row += n
    tables_out = []
    for rows, cap, tile in zip(groups, sh.capacity, (1, sh.tile)):
        assert len(rows) <= cap, (len(rows), cap)
        table = np.zeros((cap, NUM_FIELDS), np.int32)
        if rows:
            table[:len(rows)] = np.asarray(rows, np.int32)[rng.permutation(len(rows))]
        tables_out.append(TaskTable(table, np.int32(len(rows)), tile))
    meta = AttentionMetadata(block_tables=tables, groups=tuple(tables_out),
                             tree_mask=tree_mask if with_mask else None)
    kv = KVCache(k=jnp.asarray(k), v=jnp.asarray(v))
    return jnp.asarray(q), kv, meta, reference_attention(q, kv, 1, dense_meta(tables, dense, sh.kv_heads, T=sh.T))


# Families of contract cases: GQA groups 1, 3, 8; head dims 64, 128; block sizes 16, 32.
SHAPES = {
    "g1-d64-b16": Shapes(heads=2, kv_heads=2, dim=64, block_size=16),
    "g3-d128-b32": Shapes(heads=6, kv_heads=2, dim=128, block_size=32, pages=12, num_blocks=64),
    "g8-d64-b32": Shapes(heads=8, kv_heads=1, dim=64, block_size=32, pages=12, num_blocks=64),
    "g3-d64-b16": Shapes(heads=3, kv_heads=1, dim=64, block_size=16, tile=4),
}
SPLIT_TOL = dict(rtol=2e-5, atol=2e-5)

# One sequence: (q_len, history, num_splits, tree). Decodes with long histories split too.
contract_seq = st.one_of(
    st.tuples(st.just(1), st.integers(0, 330), st.integers(1, 4), st.just(False)),        # decode
    st.tuples(st.integers(2, 20), st.integers(0, 160), st.integers(1, 4), st.just(False)),  # chunk
    st.tuples(st.integers(1, 8), st.integers(0, 200), st.integers(1, 4), st.just(True)))    # tree verify




def hand_case(rows, *, tree_mask=None, tile=8, seed=3):
    """A small cache (4 heads over 2 KV heads, head_dim 16, block size 4) and one group of hand-written
    tasks: ``rows`` of (seq, q_start, q_len, q_pos, kv_start, kv_end, kv_head[, mask_kind, mask_base, split,
    num_splits])."""
    rng = np.random.default_rng(seed)
    q, kv, meta, _ = ragged_case(rng, [6, 2], [20, 3], heads=4, kv_heads=2, dim=16, block_size=4)
    tasks = np.zeros((len(rows) + 2, NUM_FIELDS), np.int32)
    for i, r in enumerate(rows):
        tasks[i, :len(r)] = r
        if len(r) < NUM_FIELDS:
            tasks[i, Field.NUM_SPLITS] = 1
    group = TaskTable(tasks, np.int32(len(rows)), tile)
    return q, kv, AttentionMetadata(block_tables=meta.block_tables, groups=(group,), tree_mask=tree_mask)


# seq 0: 6 rows at flat rows 0..5 over history 20; seq 1: 2 rows at 6..7 over history 3.
HAND_ROWS = [
    (0, 0, 6, 20, 5, 23, 0),                      # kv_start inside a block; kv_end below the last rows' bound
    (0, 0, 6, 20, 0, 12, 1, 0, 0, 0, 3),          # KV head 1 in 3 splits at 12 and 24 (block size 4)
    (0, 0, 6, 20, 12, 24, 1, 0, 0, 1, 3),
    (0, 0, 6, 20, 24, 26, 1, 0, 0, 2, 3),
    (1, 6, 2, 3, 4, 5, 0),                        # row 6 (position 3) sees nothing: zeros
    (1, 6, 2, 3, 4, 8, 1, 0, 0, 0, 2),            # split with nothing for row 6 in either split
    (1, 6, 2, 3, 8, 12, 1, 0, 0, 1, 2),
]




def empty_tree_case():
    """Three TREE rows over a 20-token history: rows 0 and 1 see tree tokens, row 2 none; head 0 unsplit, head 1
    split at the history's end (so row 2 sees nothing in either split of head 1). Returns (q, kv, meta, mask)."""
    mask = np.zeros((64, 4), np.uint8)
    mask[0, 0] = mask[1, :2] = 1
    rows = [(0, 0, 3, 20, 0, 23, 0, MaskKind.TREE, 20, 0, 1),
            (0, 0, 3, 20, 0, 20, 1, MaskKind.TREE, 0, 0, 2), (0, 0, 3, 20, 20, 24, 1, MaskKind.TREE, 0, 1, 2)]
    return (*hand_case(rows, tree_mask=mask), mask)




# ---- driving an engine ------------------------------------------------------------------------------------
def random_prompts(rng, lengths):
    return [rng.integers(3, 49000, n).tolist() for n in lengths]


def drive(engine, arrivals, prompt_ids, sampling, drafts=None):
    """Add request i at step arrivals[i]; run to the end. ``drafts(request) -> list[int]`` proposes
    speculative tokens before every step. Returns {request id: (token ids, finish_reason)}."""
    out, ids, step = {}, {}, 0
    order = sorted(range(len(prompt_ids)), key=lambda i: arrivals[i])
    while order or engine.has_unfinished():
        while order and arrivals[order[0]] <= step:
            i = order.pop(0)
            ids[i] = engine.add_request(prompt_ids[i], sampling[i])
        if drafts:
            for req in engine.scheduler.running:
                if req.num_pending == 1 and req.output_ids:
                    room = engine.max_model_len - len(req.token_ids)
                    req.draft_token_ids = drafts(req)[:min(engine.config.max_draft_tokens, room)]
        for delta in engine.step():
            toks, _ = out.get(delta.request_id, ([], None))
            out[delta.request_id] = (toks + delta.token_ids, delta.finish_reason)
        step += 1
    return [out[ids[i]] for i in range(len(prompt_ids))]


# ---- a live server -----------------------------------------------------------------------------------------
# Small buckets keep start-up short; 32 sequences fit the concurrency test in one batch.
ENGINE_FLAGS = ["--max-num-batched-tokens", "64", "--max-num-seqs", "32", "--kv-cache-memory", str(16 << 20)]


@dataclasses.dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: str

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(self.url + "/metrics").text
        return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, log_path: str, *flags: str, name: str = "tiny", env: dict | None = None) -> Server:
    """`xyjax serve` of ``model`` on a free local port (output to ``log_path``; ``env``: the process's environment,
    default this one's), once /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "xyjax.cli", "serve", "--model", model, "--served-model-name", name,
           "--port", str(port), *ENGINE_FLAGS, *flags]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = Server(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{open(log_path).read()}")
        try:
            if httpx.get(server.url + "/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server not ready after 300 s:\n{open(log_path).read()}")


# ---- tokenizer test data (unit/test_tokenizer.py and e2e/test_tokenizer_hf.py) -----------------------------------
def _long_text() -> str:
    parts = ["The river bends twice before the old mill; ", "def add(a, b):\n    return a + b\n",
             "Prices rose 3.7% to $1,234.56 in 2024. ", "東京と大阪 🚄 ", "  indented\tline\n"]
    text = ""
    while len(text) < 2000:
        text += "".join(parts)
    return text[:2000]


TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n", "3.14159 1234567890 1,000,000 -42 0x1F",
    "   leading and trailing   ", "a\n\nb\r\n\tc\n\n\n", "multiple     spaces", "don't I'm we'll they've",
    "naïve café — “quotes” ‘single’ …", "日本語のテキスト 中文 한국어", "مرحبا بالعالم", "e\u0301 \u00a0nbsp \u200b",
    "emoji 🎉👍🏽 👨‍👩‍👧 family", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start", "", " ", "\n", _long_text(),
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another? 🎨 色"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2", "tool_calls": None}, {"role": "user", "content": "  and 2+2?\n"}],
]

# Exercises the environment: namespace, loop controls, tojson options, raise_exception, {% generation %},
# trim/lstrip blocks, special-token variables, tools and extra template variables.
CUSTOM_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {% if m.role == 'bad' %}{{ raise_exception('bad role: ' + m.role) }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  [{{ m.role }}] {{ m.content | tojson }} {{ m | tojson(sort_keys=True) }} {{ m.tool_calls is defined }}
{% endfor %}
{% generation %}{{ bos_token }}|{{ eos_token }}|{{ ns.n }}{% endgeneration %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ custom_var }} {{ strftime_now('%Y') }}{% if add_generation_prompt %}<go>{% endif %}
"""


def sentencepiece_fields(arch: str = "llama") -> dict:
    """A small SentencePiece-style (``tokenizer.ggml.model == "llama"``) vocabulary with scores, no merges."""
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "ld", "▁wor", "▁world", "ll", "o", "▁he",
              "▁hello", "hello", "▁is", "is", "at", *"abcdefghijklmnopqrstuvwxyz"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * 259
    for i, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece), types.append(1), scores.append(-float(i))
    tokens += ["<think>", "<|im_end|>"]
    types += [4, 3]
    scores += [0.0, 0.0]
    return {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}"}


def stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


def gguf_block_bytes(qtype: str, values: np.ndarray, rng) -> np.ndarray:
    """``values`` [..., N, K] float32 as GGUF blocks of ``qtype`` [..., N, row_bytes] uint8: gguf's own quantizer
    where it has one (Q8_0, Q4_0, Q4_1); Q4_K and Q6_K, which gguf cannot quantize, as random blocks (every byte
    random, the float16 scales finite and small) of the same shape."""
    import gguf

    from xyjax.ops.gemm.formats import GGUF_QTYPES

    qt = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        return gguf.quants.quantize(np.asarray(values, np.float32), qt)
    block, nbytes = GGUF_QTYPES[qtype]
    *lead, k = values.shape
    raw = rng.integers(0, 256, (*lead, k // block, nbytes), dtype=np.uint8)
    scales = (0.01 * rng.standard_normal((*lead, k // block, 2 if qtype == "Q4_K" else 1))).astype(np.float16)
    raw[..., slice(0, 4) if qtype == "Q4_K" else slice(208, 210)] = scales.view(np.uint8)
    return raw.reshape(*lead, k // block * nbytes)
