"""examples/gpu_check.py, the one-run GPU check (issue 27), in its --dry-run mode on CPU: every section's code runs
(tiny shapes, the Pallas kernels in the interpreters, the engine against its CPU-backend reference in a
subprocess), so the script a GPU session runs cannot rot; the time-limit path; the default model's shapes."""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "examples", "gpu_check.py"))
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_dry_run_every_section(tmp_path):
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--dry-run"]) == 0
    files = sorted(os.listdir(out))
    assert files == sorted([f"{s}.json" for s in gpu_check.SECTIONS] + ["summary.json", "log.txt"])
    assert len(files) <= 8            # what one device run brings back
    data = {s: json.loads((out / f"{s}.json").read_text()) for s in gpu_check.SECTIONS}
    assert all(d["status"] == "done" and d["dry_run"] for d in data.values())
    case = data["attention"]["cases"]["fig7-tiny"]
    assert case["pass"] and set(case["rel_error"]) == {"pallas-mosaic", "pallas-triton", "xla-backend"}
    assert max(case["rel_error"].values()) < 1e-2 and case["ms"]["stage-by-stage-xla"] > 0
    shape = data["gemm"]["shapes"]["tiny"]
    assert shape["pass_"] and [r["m"] for r in shape["rows"]] == [1, 5, 16]
    assert all(r["rows_past_m_zero"] and set(r["ms"]) == {"pallas-mosaic", "pallas-triton", "xla-padded",
                                                          "xla-exact-m"} for r in shape["rows"])
    run = data["engine"]["runs"]["tiny/float32/xla"]
    assert run["equal_to_cpu"] and run["must_equal"] and len(run["tokens"]) == len(gpu_check.PROMPTS)
    assert data["bench"]["runs"]["float32/xla"]["total_tokens_per_s"] > 0
    assert data["env"]["default_backend"] == "cpu"


def test_a_section_past_its_limit_is_recorded(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(gpu_check.DRY_TIMEOUTS, "env", 0.01)
    assert gpu_check.main([str(tmp_path), "--dry-run", "--only", "env"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["env"]["status"].startswith("timed out")
    assert json.loads((tmp_path / "env.json").read_text())["status"].startswith("timed out")
    with pytest.raises(SystemExit):
        gpu_check.main([str(tmp_path), "--only", "envv"])
    assert "unknown section" in capsys.readouterr().err


def test_bench_shapes_are_the_default_models():
    """The bench section's random model has the default model's config (its GGUF cannot travel to the GPU)."""
    from models import registry
    from models.config import ModelConfig

    path = os.path.join(registry.cache_dir(), registry.KNOWN_MODELS[registry.DEFAULT_MODEL].filename)
    if not os.path.isfile(path):
        pytest.skip(f"the default model is not in the cache ({path})")
    from models.gguf_loader import load_gguf
    cfg, _, _ = load_gguf(path, False)
    assert ModelConfig(**gpu_check.SMOLLM2_135M) == cfg
