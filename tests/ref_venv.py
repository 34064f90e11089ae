"""transformers and torch for the tests, from the HF reference environment (``.venv-ref``, ``make ref-env``) and
not from this process: ``importorskip("transformers")`` returns a proxy of the module as imported by a worker
process (``ref_venv_worker.py``) running the reference interpreter (``$XYJAX_REF_PYTHON``, else
``.venv-ref/bin/python``; see ``xyjax.bench.peers.reference_python``). Attribute access, calls, indexing,
``len``, ``int``, ``float``, ``with`` and iteration on a proxy run there; results of the built-in plain types and
numpy arrays come back as values (``tensor.numpy()``, ``tokenizer.encode(text)``), any other object as another
proxy. So the comparisons read as they would with transformers imported here. When the reference interpreter is
missing, ``importorskip`` skips the test with a reason naming ``make ref-env``."""

from __future__ import annotations

import atexit
import io
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ref_venv_worker.py")
PLAIN = (str, bytes, int, float, complex, bool, type(None), list, tuple, dict, set, frozenset)


class RemoteError(Exception):
    """An exception raised in the reference process (its type, message and traceback in the text)."""


def python() -> str:
    """The reference interpreter; skips the calling test when there is none."""
    from xyjax.bench.peers import PeerUnavailable, reference_python

    try:
        return reference_python()
    except PeerUnavailable as e:
        pytest.skip(f"needs the HF reference environment: {e}")


def importorskip(module: str) -> Remote:
    """``module`` imported in the reference process (a proxy); skips when there is no reference interpreter.
    A reference environment that lacks the module is an error: ``make ref-env`` installs it."""
    return _worker().request("import", module)


class Remote:
    """An object living in the reference process."""

    def __init__(self, worker: _Worker, handle: int):
        object.__setattr__(self, "_worker", worker)
        object.__setattr__(self, "_handle", handle)

    def _do(self, op, *args, **kwargs):
        return self._worker.request(op, self, *args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self._do("getattr", name)

    def __call__(self, *args, **kwargs):
        return self._do("call", *args, **kwargs)

    def __getitem__(self, key):
        return self._do("getitem", key)

    def __len__(self):
        return self._do("len")

    def __int__(self):
        return self._do("int")

    def __index__(self):
        return self._do("int")

    def __float__(self):
        return self._do("float")

    def __bool__(self):
        return self._do("bool")

    def __iter__(self):
        return iter(self._do("list"))

    def __eq__(self, other):
        return self._do("eq", other)

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<reference process: {self._do('repr')}>"

    def __enter__(self):
        return self._do("getattr", "__enter__")()

    def __exit__(self, *exc):
        return self._do("getattr", "__exit__")(None, None, None)

    def __del__(self):
        self._worker.released.append(self._handle)


class _Out(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Remote):
            return ("h", obj._handle)
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return ("nd", obj.dtype.str, obj.shape, np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, np.generic):
            return ("np", obj.dtype.str, obj.tobytes())
        return None


class _Worker:
    def __init__(self, python: str):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        self.python, self.released = python, []
        self.proc = subprocess.Popen([python, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

    def request(self, op, *args, **kwargs):
        released, self.released = self.released, []
        buf = io.BytesIO()
        _Out(buf, protocol=4).dump((released, op, args, kwargs))
        try:
            self.proc.stdin.write(struct.pack("<Q", buf.tell()) + buf.getvalue())
            self.proc.stdin.flush()
            head = self.proc.stdout.read(8)
        except BrokenPipeError:
            head = b""
        if len(head) < 8:
            raise RemoteError(f"the reference process ({self.python}) exited (code {self.proc.poll()})")
        (n,) = struct.unpack("<Q", head)
        unpickler = pickle.Unpickler(io.BytesIO(self.proc.stdout.read(n)))
        unpickler.persistent_load = self._load
        status, value = unpickler.load()
        if status == "err":
            raise RemoteError(value)
        return value

    def _load(self, pid):
        if pid[0] == "h":
            return Remote(self, pid[1])
        if pid[0] == "nd":
            return np.frombuffer(pid[3], np.dtype(pid[1])).reshape(pid[2]).copy()
        return np.frombuffer(pid[2], np.dtype(pid[1]))[0]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_WORKER: _Worker | None = None


def _worker() -> _Worker:
    global _WORKER
    if _WORKER is None or _WORKER.proc.poll() is not None:
        _WORKER = _Worker(python())
        atexit.register(_WORKER.close)
    return _WORKER
