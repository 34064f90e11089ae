"""The `xyjax` command line without a model download: a bad model path, engine option flags (the default
model through `xyjax generate` is in e2e/test_default_model.py)."""

import subprocess
import sys


def test_generate_reports_a_bad_model_path(tmp_path):
    cmd = [sys.executable, "-m", "xyjax.cli", "generate", "hi", "--model", str(tmp_path / "nope.gguf")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "unknown model" in done.stderr and "nope.gguf" in done.stderr


def test_engine_option_flags_reach_the_engine_config(monkeypatch):
    """--no-enable-prefix-caching and --speculative JSON become EngineConfig fields; bad JSON is refused."""
    import pytest

    from xyjax import cli
    from xyjax.bench import runs
    from xyjax.engine.config import EngineConfig

    seen = {}
    monkeypatch.setattr(runs, "bench", lambda *args, **options: seen.update(options))
    argv = ["bench", "--no-enable-prefix-caching", "--speculative", '{"method": "ngram", "num_draft_tokens": 3}']
    assert cli.main(argv) == 0
    config = EngineConfig.from_options({k: v for k, v in seen.items() if k in ("enable_prefix_caching", "speculative")})
    assert config.enable_prefix_caching is False and config.speculative.num_draft_tokens == 3
    with pytest.raises(SystemExit):
        cli.main(["bench", "--speculative", "{not json"])
