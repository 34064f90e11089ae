"""The offline SmoothGEMM profile: table round trip, lookup rules, a real (tiny) ffi sweep, the CLI."""

import json

import jax
import pytest

from models.llama import linear_shapes
from xyjax.ops.gemm import profile as gemm_profile
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


def test_pallas_profiling_is_refused_on_cpu():
    with pytest.raises(ValueError, match="needs a GPU"):
        gemm_profile.profile({"a": (32, 48, False)}, [16], "pallas")
    with pytest.raises(ValueError, match="no tunables"):
        gemm_profile.candidates("xla")


def test_engine_runs_the_profiled_tunables(monkeypatch, tmp_path, tiny_model):
    """A saved profile for this device is loaded at start and its tunables reach every GEMM (here ones no
    default uses: one lane, row split, m rounded up to 16, no streaming kernel): greedy output unchanged; no
    profile: defaults."""
    from xyjax import LLM, SamplingParams

    monkeypatch.setenv("XYJAX_CACHE_DIR", str(tmp_path))
    cfg = tiny_model.config
    odd = (("lanes", 1), ("m_align", 16), ("split_rows", True), ("stream_rows", 0))
    table = GemmProfile(device=jax.devices()[0].device_kind, backend="ffi", entries=tuple(
        (("plain", T, K, N, tr), odd) for K, N, tr in linear_shapes(cfg).values() for T in (16, 32)))
    prompts = [[5, 9, 200, 7, 11, 3, 90, 4, 8, 1000, 33], [17, 4]]
    sampling = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    options = dict(block_size=4, max_num_batched_tokens=32, max_num_seqs=4, progress=False)
    plain = LLM(tiny_model, gemm_backend="ffi", **options)
    assert plain.engine.backends.gemm_profile is None
    expected = [o.token_ids for o in plain.generate(prompts, sampling)]
    table.save(gemm_profile.default_path(table.device, "ffi"))
    tuned = LLM(tiny_model, gemm_backend="ffi", **options)
    assert tuned.engine.backends.gemm_profile == table
    K, N, _ = linear_shapes(cfg)["qkv"]
    hlo = jax.jit(lambda x, w: tuned.engine.backends.smooth_gemm(x, w, 3, transpose_w=True)).lower(
        jax.numpy.zeros((16, K)), jax.numpy.zeros((N, K))).as_text()
    assert "m_align = 16" in hlo and "split_rows = true" in hlo and "stream_rows = 0" in hlo
    assert [o.token_ids for o in tuned.generate(prompts, sampling)] == expected
