"""The Ascend meta-kernels (ascend_ffi/ascendc/) as far as a machine without an NPU checks them: the host tiling
(here), the structure of the AscendC kept in the tree (here), its match with a fresh translation, and the kernels
under asctile's interpreter against the xla oracle (both in the pyasc-dev venv, ``make ascend-env``, in a
subprocess; skipped naming that target when it is absent). Nothing here compiles or runs AscendC."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from xyjax.ops.attention import ascend_tiling as at
from xyjax.ops.attention.contract import Field, MaskKind
from xyjax.ops.attention.metadata import merge_partials
from xyjax.ops.attention.tiling import attention_metadata
from xyjax.ops.attention.xla import attend_xla
from xyjax.ops.gemm.ascend_tiling import SHAPES as GEMM_SHAPES, GemmTiling, gemm_tiling
from xyjax.ops.kv_cache import KVCache

ROOT = pathlib.Path(__file__).resolve().parents[2]
ASC = ROOT / "ascend_ffi" / "ascendc"
VENV_PY = ROOT / ".venv-asctile" / "bin" / "python"
GENERATED = {p.stem: p.read_text() for p in (ASC / "generated").glob("*.cpp")}


def asctile_python() -> str:
    if not VENV_PY.exists():
        pytest.skip("needs the pyasc-dev venv .venv-asctile: run `make ascend-env`")
    return str(VENV_PY)


# ---- host side ------------------------------------------------------------------------------------------

def test_deal_is_largest_first_symmetric_round_robin():
    loads = [5, 80, 10, 70, 20, 60, 30, 50, 40]      # ranks: 80 70 60 | 50 40 30 | 20 10 5
    order, offsets = at.deal(loads, 3)
    cores = [list(order[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]
    # laps go 0 1 2, then 2 1 0, then 0 1 2
    assert cores == [[1, 6, 4], [3, 8, 2], [5, 7, 0]]
    with pytest.raises(ValueError, match="num_cores"):
        at.deal(loads, 0)


def fig7(num_kv_heads=2, tile=128, block_size=16, max_splits=1, lanes=1):
    """XY-Serve Fig. 7's batch: P 362 tokens (KV 1318), D (KV 1657), V 53 tokens (KV 2036), D (KV 1986)."""
    q_len = np.array([362, 1, 53, 1])
    kv_len = np.array([1318, 1657, 2036, 1986])
    pages = -(-kv_len.max() // block_size)
    tables = np.arange(len(q_len) * pages).reshape(len(q_len), pages)
    tables = np.random.default_rng(7).permutation(tables.size).reshape(tables.shape).astype(np.int32)
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]])
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=num_kv_heads, tile=tile,
                              block_size=block_size, max_splits=max_splits, lanes=lanes)
    return meta, q_len, tables


def test_token_table_of_fig7():
    meta, _, _ = fig7()
    groups = [(g.tasks, g.num_tasks, g.tile) for g in meta.groups]
    assert at.token_table(groups).tolist() == [
        [at.STAGE_D, 362, 1, 1656, 1], [at.STAGE_D, 416, 1, 1985, 1],
        [at.STAGE_P, 0, 362, 956, 128], [at.STAGE_P, 363, 53, 1983, 128]]


def test_pipeline_rule():
    meta, _, _ = fig7()
    groups = [(g.tasks, g.num_tasks, g.tile) for g in meta.groups]
    decode_only = [groups[0], (groups[1][0], 0, 128)]
    assert at.choose_pipeline(decode_only, 24, 4) == at.PIPELINE_2STAGE
    # chunk tiles of 128 x 4 rows over ~2000 positions: about 1 M scores per core at once
    held = sum(int(at.task_loads(*g[:2], 4).max()) for g in groups)      # 1 core: the largest of each group
    assert at.choose_pipeline(groups, 1, 4, cache_bytes=int(4 * held) + 1) == at.PIPELINE_3STAGE
    assert at.choose_pipeline(groups, 1, 4, cache_bytes=int(4 * held)) == at.PIPELINE_4STAGE
    assert at.choose_pipeline(groups, 24, 4) == at.PIPELINE_4STAGE


def test_gemm_tiling():
    t = gemm_tiling(5, 4096, 11008, {"n_tile": 256, "order": 1})
    assert (t.m_tile, t.n_tile, t.k_tile, t.order) == (16, 256, 128, 1)
    assert gemm_tiling(300, 4096, 4096).m_tile == 128
    assert gemm_tiling(60, 4096, 4096, {"n_tile": 256}).m_tile == 32     # 64 x 256 is not among the shapes
    with pytest.raises(ValueError, match="n_tile"):
        gemm_tiling(5, 4096, 100)


@pytest.mark.parametrize("mirror,struct", [(at.AttentionTiling, "XyjaxAscendAttentionTiling"),
                                           (GemmTiling, "XyjaxAscendGemmTiling")])
def test_ctypes_mirror_matches_header(mirror, struct, tmp_path):
    names = [name for name, _ in mirror._fields_]
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to read the tiling header's layout")
    prints = "".join(f' std::printf(" %zu %zu", offsetof({struct}, {f}), sizeof((({struct}*)0)->{f}));' for f in names)
    (tmp_path / "layout.cc").write_text(f'#include <cstddef>\n#include <cstdio>\n#include "xyjax/ascend_tiling.h"\n'
                                        f'int main() {{ std::printf("%zu", sizeof({struct}));{prints} }}\n')
    build = subprocess.run([cxx, "-I", str(ROOT / "ascend_ffi" / "include"), str(tmp_path / "layout.cc"), "-o",
                            str(tmp_path / "layout")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr          # a field the header lacks fails here
    size, *rest = map(int, subprocess.run([str(tmp_path / "layout")], capture_output=True, text=True,
                                          check=True).stdout.split())
    assert size == at.ctypes.sizeof(mirror)                # a field the mirror lacks fails here
    for name, offset, width in zip(names, rest[::2], rest[1::2]):
        assert (offset, width) == (getattr(mirror, name).offset, getattr(mirror, name).size), name
    header = (ROOT / "ascend_ffi" / "include" / "xyjax" / "ascend_tiling.h").read_text()
    body = re.search(rf"typedef struct {struct} \{{(.*?)\}}", header, re.S).group(1)
    c_types = re.findall(r"^\s*(int32_t|float)\s+(\w+);", body, re.M)
    assert [n for _, n in c_types] == names
    assert [t for t, _ in c_types] == ["float" if f is at.ctypes.c_float else "int32_t" for _, f in mirror._fields_]


def test_kernel_reads_the_tile_contract():
    """The asctile kernel (run in another venv, so it cannot import contract.py) names the contract's columns."""
    src = (ASC / "kernels" / "meta_attention.py").read_text()
    names = re.search(r"^(SEQ, .*) = range\((\d+)\)$", src, re.M)
    assert names.group(1).split(", ") == [f.name for f in Field][:int(names.group(2))]
    assert re.search(r"^F = (\d+) ", src, re.M).group(1) == str(len(Field))


# ---- the AscendC kept in the tree -----------------------------------------------------------------------

def test_generated_attention_structure():
    src = GENERATED["meta_attention_t16_g1_d128_p16"]
    assert "kernel type MIX_AIC_1_2" in src                                 # cube and vector cores
    assert re.search(r"__global__ __aicore__ void meta_attention_t16_g1_d128_p16\(", src)
    assert "AscendC::GetBlockIdx()" in src                                  # the core's slice of the deal
    assert src.count("AscendC::Mmad") >= 2                                 # QK^T and PV on the cube
    assert "ASCEND_IS_AIC" in src and "ASCEND_IS_AIV" in src
    assert "CrossCoreSetFlag" in src and "CrossCoreWaitFlag" in src         # cube <-> vector hand-off
    assert "AscendC::Exp" in src and "AscendC::ReduceMax" in src            # online softmax on the vector unit
    # the task loop's bounds are read from offs; the block table is read per page
    assert re.search(r"for \(int32_t \w+ = \w+; \w+ < \w+; \w+ \+= c1_i32\)", src)
    assert "v4_tables_ptr" in src and "v5_tasks_ptr" in src
    # 910B has no on-chip path between cube and vector cores: nothing is fixpiped into UB (a C310 path); S and PV
    # leave L0C for the GM workspaces (Fixpipe), the cube signals after it (PIPE_FIX) and the vector side waits
    assert "C310" not in src
    assert re.search(r"void meta_attention_\w+\(.*s_ws_ptr.*p_ws_ptr.*pv_ws_ptr", src)
    assert src.count("AscendC::Fixpipe<") >= 2 and "CrossCoreSetFlag<4, PIPE_FIX>" in src


def test_generated_three_stage_structure():
    """The 3-stage form: its own QK^T, softmax (max, then exp and sum) and PV loops over the task's blocks, and PV
    accumulated in one L0C accumulator across them (Mmad's init flag cleared after the first block)."""
    src = GENERATED["meta_attention_t16_g1_d128_p16_s3_kw2048"]
    assert "C310" not in src and "kernel type MIX_AIC_1_2" in src
    assert len(re.findall(r"for \(int32_t", src)) >= 5            # the task loop and four block loops
    assert re.search(r"cmatrixInitVal = \w+;", src) and src.count("AscendC::Mmad") >= 2


def test_generated_gemm_structure():
    # one kernel per dtype and tile shape the host may pick
    assert {stem for stem in GENERATED if stem.startswith("smooth_gemm")} == {
        f"smooth_gemm_{dt}_m{mt}_n{nt}_k4096" for dt in ("f16", "bf16") for mt, nt in GEMM_SHAPES}
    for stem, src in GENERATED.items():
        if not stem.startswith("smooth_gemm"):
            continue
        mt = stem.split("_m")[1].split("_")[0]
        assert re.search(rf"__global__ __aicore__ void {stem}\(", src)
        assert "AscendC::Mmad" in src and "C310" not in src
        # tiles over cores: for (tile = GetBlockIdx(); tile < ...; tile += GetBlockNum())
        assert "AscendC::GetBlockIdx()" in src and "AscendC::GetBlockNum()" in src
        # virtual padding: the x load's row count is clamped to the real rows (min(max(m - row, 0), M_TILE))
        assert re.search(rf"\(\(\w+ < c{mt}_i32\) \? \(\w+\) : \(c{mt}_i32\)\)", src), stem
        assert ("bfloat16_t" in src) == ("_bf16_" in stem)


def test_launcher_matches_kernel_signatures():
    """host/launch.cc (never compiled) passes each kernel its arguments in the generated signature's order, and
    generated/variants.h lists every generated kernel."""
    launch = (ASC / "host" / "launch.cc").read_text()
    variants = (ASC / "generated" / "variants.h").read_text()
    assert sorted(re.findall(r'#include "aclrtlaunch_(\w+)\.h"', variants)) == sorted(GENERATED)
    host_name = {"pages": "max_pages", "kv_heads": "num_kv_heads"}      # kernel parameter -> tiling field
    for kind, stem in (("GEMM", "smooth_gemm_f16_m16_n64_k4096"), ("ATTENTION", "meta_attention_t16_g1_d128_p16")):
        params = re.search(rf"void {stem}\((.*?)\) \{{", GENERATED[stem]).group(1).split(", ")
        names = [re.sub(r"^v\d+_", "", p.split()[-1]) for p in params]
        call = re.search(rf"#define XYJAX_{kind}_CASE.*?aclrtlaunch_##KERNEL\((.*?)\)\);", launch, re.S).group(1)
        args = [a.strip() for a in call.replace("\\", "").split(",")][2:]          # after num_cores, stream
        assert len(args) == len(names)
        scalars = [(n, a) for n, a in zip(names, args) if not n.endswith("_ptr") and n != "ffts_addr"]
        assert all(a == f"t.{host_name.get(n, n)}" for n, a in scalars), scalars
        assert args[-1] == "ffts" and names[-1] == "ffts_addr"
    # the interpreter gets the same scalars in the same order (xyjax's host side)
    fields = [host_name.get(n, n) for n, _ in scalars]
    t = at.AttentionTiling(**{f: i + 1 for i, f in enumerate(fields) if f != "scale"}, scale=0.5)
    assert at.scalar_arguments(t)[:len(fields)] == [getattr(t, f) for f in fields]


def test_generated_matches_fresh_translation():
    out = subprocess.run([asctile_python(), str(ASC / "translate.py"), "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]


# ---- the kernels under asctile's interpreter against the xla oracle ------------------------------------

def interpret(kernel, cores, arrays, scalars, tmp_path):
    np.savez(tmp_path / "in.npz", *arrays, scalars=np.asarray(scalars, np.float64))
    out = subprocess.run([asctile_python(), str(ASC / "interpret.py"), kernel, str(cores), str(tmp_path / "in.npz"),
                          str(tmp_path / "out.npz")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    data = np.load(tmp_path / "out.npz")
    return [data[f"arr_{i}"] for i in range(len(arrays))]


def run_attention(meta, q, kv, tmp_path, cores, pipeline):
    """The kernel (the form that runs ``pipeline``) on every group, merged by log-sum-exp: [T, H, D] float32."""
    num_tokens, num_heads, head_dim = q.shape
    k, v = np.asarray(kv.k[0]), np.asarray(kv.v[0])
    max_tree = 0 if meta.tree_mask is None else meta.tree_mask.shape[1]
    parts = []
    for g in meta.groups:
        tiling = at.attention_tiling(g.tasks, g.num_tasks, tile=g.tile, num_cores=cores, pipeline=pipeline,
                                     num_tokens=num_tokens, num_heads=num_heads, num_kv_heads=kv.num_kv_heads,
                                     head_dim=head_dim, num_blocks=k.shape[0], block_size=kv.block_size,
                                     block_tables=meta.block_tables, max_tree=max_tree, scale=head_dim ** -0.5)
        arrays = at.attention_operands(q, k, v, meta.block_tables, g.tasks, meta.tree_mask, tiling)
        out = np.zeros((tiling.num_slots * tiling.rows, head_dim), np.float32)
        lse = np.zeros(tiling.num_slots * tiling.rows, np.float32)
        res = interpret("meta_attention", cores, arrays + at.workspaces(tiling) + [out, lse],
                        at.scalar_arguments(tiling), tmp_path)
        parts.append(at.partial_parts(g.tasks, g.num_tasks, res[-2], res[-1], tiling, num_tokens))
    return np.asarray(merge_partials(q.shape, [tuple(map(jnp.asarray, p)) for p in parts])[0])


def random_inputs(meta, num_tokens, num_blocks, rng, num_heads=4, num_kv_heads=2, head_dim=64, block_size=16):
    q = rng.standard_normal((num_tokens, num_heads, head_dim)).astype(np.float16)
    shape = (1, num_blocks, num_kv_heads, block_size, head_dim)
    kv = KVCache(k=jnp.asarray(rng.standard_normal(shape), jnp.float16),
                 v=jnp.asarray(rng.standard_normal(shape), jnp.float16))
    oracle = np.asarray(attend_xla(jnp.asarray(q), kv, 0, meta, head_dim ** -0.5))
    return q, kv, oracle


ERROR = 2e-3     # float16 P into the PV matmul against the oracle's float32 (measured about 2e-4)


@pytest.mark.parametrize("pipeline", [at.PIPELINE_4STAGE, at.PIPELINE_3STAGE])
def test_interpreted_attention_fig7(pipeline, tmp_path):
    asctile_python()
    meta, q_len, tables = fig7()
    q, kv, oracle = random_inputs(meta, int(q_len.sum()), tables.size, np.random.default_rng(0))
    got = run_attention(meta, q, kv, tmp_path, cores=3, pipeline=pipeline)
    err = np.abs(got - oracle).max()
    print(f"Fig. 7 batch, {pipeline}-stage: max abs error {err:.2e} vs the xla oracle")
    assert err < ERROR


@pytest.mark.parametrize("seed,num_heads,num_kv_heads,head_dim,pipeline", [(1, 4, 2, 64, 4), (2, 2, 2, 128, 4),
                                                                          (3, 4, 2, 64, 3)])
def test_interpreted_attention_random_tables(seed, num_heads, num_kv_heads, head_dim, pipeline, tmp_path):
    """Random hybrid batches: chunks with history, decodes, KV splits and a token tree. The second case runs the
    specialisations kept in generated/ (tiles 16 and 1, one query head per KV head, head_dim 128, block 16,
    trees up to 64 tokens)."""
    asctile_python()
    rng = np.random.default_rng(seed)
    num_seqs, block_size = 5, 16
    q_len = rng.integers(1, 40, num_seqs)
    q_len[rng.integers(num_seqs)] = 1
    kv_len = q_len + rng.integers(0, 300, num_seqs)
    tree_seq = int(np.flatnonzero(q_len > 2)[0]) if (q_len > 2).any() else None
    trees = {}
    if tree_seq is not None:
        trees[tree_seq] = [-1] + [int(rng.integers(0, j)) for j in range(1, int(q_len[tree_seq]))]
    pages = -(-kv_len.max() // block_size)
    tables = rng.permutation(num_seqs * pages).reshape(num_seqs, pages).astype(np.int32)
    q_start = np.concatenate([[0], np.cumsum(q_len)[:-1]])
    meta = attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=num_kv_heads, tile=16,
                              block_size=block_size, max_splits=3, lanes=4, min_split_kv=32, trees=trees, max_tree=64)
    tasks = np.concatenate([np.asarray(g.tasks)[:int(g.num_tasks)] for g in meta.groups])
    assert (tasks[:, Field.NUM_SPLITS] > 1).any()                          # some task is split
    assert (tasks[:, Field.MASK_KIND] == MaskKind.TREE).any()              # and some is TREE
    q, kv, oracle = random_inputs(meta, int(q_len.sum()), tables.size, rng, num_heads, num_kv_heads, head_dim)
    err = np.abs(run_attention(meta, q, kv, tmp_path, cores=4, pipeline=pipeline) - oracle).max()
    print(f"random tables (seed {seed}, {pipeline}-stage): max abs error {err:.2e} vs the xla oracle")
    assert err < ERROR


@pytest.mark.parametrize("m,n_tile,order", [(1, 128, 0), (5, 64, 1), (37, 128, 1)])
def test_interpreted_gemm(m, n_tile, order, tmp_path):
    from xyjax.ops.gemm.xla import gemm as gemm_xla

    asctile_python()
    rng = np.random.default_rng(m)
    k, n = 512, 256
    x = rng.standard_normal((m, k)).astype(np.float16)
    w = rng.standard_normal((n, k)).astype(np.float16)
    t = gemm_tiling(m, k, n, {"n_tile": n_tile, "order": order}, num_cores=3)
    out = np.full((t.m_tile, n), np.nan, np.float16)   # one whole tile of rows: those past m must stay untouched
    scalars = [t.m, t.n, t.order, t.m_tile, t.n_tile, t.k_tile, t.k]
    got = interpret("smooth_gemm", t.num_cores, [x, w, out], scalars, tmp_path)[2].astype(np.float32)
    oracle = np.asarray(gemm_xla(jnp.asarray(x), jnp.asarray(w), m, None, True, {})).astype(np.float32)
    assert np.isnan(got[m:]).all()                     # virtual padding: no output row past m is written
    np.testing.assert_allclose(got[:m], oracle, rtol=2e-3, atol=0.1)
