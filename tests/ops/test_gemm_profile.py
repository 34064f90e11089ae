"""The offline SmoothGEMM profile: table round trip, lookup rules, a real (tiny) ffi sweep, the CLI."""

import json

import jax
import numpy as np
import pytest

from helpers import gguf_block_bytes
from xyjax.ops.gemm import profile as gemm_profile
from xyjax.ops.gemm.formats import GGUFBlocks
from xyjax.ops.gemm.profile import GemmProfile

TABLE = GemmProfile(device="cpu", backend="ffi", entries=(
    (("plain", 16, 64, 96, False), (("threads", 1),)),
    (("plain", 64, 64, 96, False), (("threads", 2),)),
    (("plain", 16, 64, 500, True), (("threads", 2),)),
    (("split", 16, 64, 500, True), (("threads", 3),)),
))


def test_json_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "table.json")
    TABLE.save(path, timings={"qkv T=16": {'{"threads": 1}': 0.1}})
    assert GemmProfile.load(path) == TABLE
    assert json.load(open(path))["timings_ms"]["qkv T=16"]
    assert hash(GemmProfile.load(path)) == hash(TABLE)    # usable as a static jit argument


def test_lookup_takes_the_smallest_profiled_bucket_that_covers_t():
    assert TABLE.params("plain", 8, 64, 96) == {"threads": 1}
    assert TABLE.params("plain", 16, 64, 96) == {"threads": 1}
    assert TABLE.params("plain", 17, 64, 96) == {"threads": 2}
    assert TABLE.params("plain", 512, 64, 96) == {"threads": 2}       # past the largest: the largest
    assert TABLE.params("plain", 16, 64, 500, transpose_w=True) == {"threads": 2}
    assert TABLE.params("split", 16, 64, 500, transpose_w=True) == {"threads": 3}   # keyed by weight format
    assert TABLE.params("tiles", 16, 64, 500, transpose_w=True) == {}   # a format never profiled: its defaults
    assert TABLE.params("plain", 16, 64, 500) == {}                    # other orientation: never profiled
    assert TABLE.params("plain", 16, 32, 96) == {}


def test_default_path_is_keyed_by_device_and_backend(monkeypatch, tmp_path):
    monkeypatch.setenv("XYJAX_CACHE_DIR", str(tmp_path))
    path = gemm_profile.default_path("NVIDIA H100 80GB HBM3", "pallas")
    assert path == str(tmp_path / "gemm-profiles" / "nvidia-h100-80gb-hbm3-pallas.json")
    assert gemm_profile.load_default("ffi") is None
    TABLE.save(gemm_profile.default_path(jax.devices()[0].device_kind, "ffi"))
    assert gemm_profile.load_default("ffi") == TABLE


def test_profile_sweeps_every_candidate_and_keeps_the_fastest():
    shapes = {"a": (32, 48, False), "head": (32, 80, True)}
    table, timings = gemm_profile.profile(shapes, [16, 32], "ffi", repeat=1, stream_bytes=1 << 16)
    assert table.backend == "ffi" and len(table.entries) == 4
    assert set(timings) == {"a T=16", "a T=32", "head T=16", "head T=32"}
    for (fmt, T, K, N, tr), params in table.entries:
        assert fmt == "plain"
        name = "a" if N == 48 else "head"
        ms = timings[f"{name} T={T}"]
        assert len(ms) == len(gemm_profile.candidates("ffi"))
        assert json.dumps(dict(params), sort_keys=True) == min(ms, key=ms.get)


def test_profile_of_gguf_blocks_keys_each_qtype_and_round_trips(tmp_path):
    """Sample weights as GGUF blocks (Q4_1 dense, Q8_0 head, as the default model's): each shape swept over the
    block candidates and keyed "blocks:<qtype>", the table saved and loaded, the engine's lookups finding them."""
    rng = np.random.default_rng(3)
    weights = {name: GGUFBlocks(gguf_block_bytes(qtype, rng.standard_normal((n, 64), np.float32), rng), qtype, 64)
               for name, qtype, n in (("a", "Q4_1", 48), ("head", "Q8_0", 80))}
    shapes = {"a": (64, 48, True), "head": (64, 80, True)}
    table, timings = gemm_profile.profile(shapes, [16], "ffi", weights=weights, repeat=1, stream_bytes=1 << 16)
    options = gemm_profile.candidates("ffi", "blocks:Q4_1", (1, 9, 16))   # bucket 16's rows
    assert {p["stream_rows"] for p in options} == {24, 8, 0} and {p["m_align"] for p in options} == {1}
    assert all(len(ms) == len(options) for ms in timings.values())
    path = str(tmp_path / "blocks.json")
    table.save(path, timings)
    loaded = GemmProfile.load(path)
    assert loaded == table and {key[0] for key, _ in loaded.entries} == {"blocks:Q4_1", "blocks:Q8_0"}
    for (fmt, T, K, N, tr), params in table.entries:
        ms = timings[f"{'a' if N == 48 else 'head'} T={T}"]
        assert json.dumps(dict(params), sort_keys=True) == min(ms, key=ms.get)
        assert loaded.params(fmt, 9, K, N, tr) == dict(params)
    assert loaded.params("blocks:Q4_0", 16, 64, 48, True) == {}   # another qtype: its defaults


def test_pallas_profiling_is_refused_on_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        gemm_profile.profile({"a": (32, 48, False)}, [16], "pallas")
    with pytest.raises(ValueError, match="no tunables"):
        gemm_profile.candidates("xla")
