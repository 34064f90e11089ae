"""The HF reference environment's side of ``ref_venv.py``: run by ``.venv-ref/bin/python`` (torch, transformers),
it serves requests on stdin and answers on stdout, each a length-prefixed pickle. A request is
``(released handles, operation, args, kwargs)``; the answer ``("ok", value)`` or ``("err", text)``. Values of the
built-in plain types (and numpy arrays and scalars, as raw bytes) travel by value; any other object stays here
under a handle that the other side holds as a proxy. Stdlib and numpy only at import (no jax, no xyjax)."""

import importlib
import io
import operator
import os
import pickle
import struct
import sys
import traceback

import numpy as np

PLAIN = (str, bytes, int, float, complex, bool, type(None), list, tuple, dict, set, frozenset)
OPERATIONS = {
    "import": importlib.import_module, "getattr": getattr, "call": lambda f, *a, **k: f(*a, **k),
    "getitem": operator.getitem, "len": len, "int": int, "float": float, "bool": bool, "repr": repr,
    "list": list, "eq": operator.eq,
}
objects: dict[int, list] = {}   # handle -> [object, proxies the other side holds of it]


class Out(pickle.Pickler):
    def persistent_id(self, obj):
        if type(obj) in PLAIN:
            return None
        if isinstance(obj, np.ndarray) and obj.dtype != object:
            return ("nd", obj.dtype.str, obj.shape, np.ascontiguousarray(obj).tobytes())
        if isinstance(obj, np.generic):
            return ("np", obj.dtype.str, obj.tobytes())
        objects.setdefault(id(obj), [obj, 0])[1] += 1
        return ("h", id(obj))


class In(pickle.Unpickler):
    def persistent_load(self, pid):
        if pid[0] == "h":
            return objects[pid[1]][0]
        if pid[0] == "nd":
            return np.frombuffer(pid[3], np.dtype(pid[1])).reshape(pid[2]).copy()
        return np.frombuffer(pid[2], np.dtype(pid[1]))[0]   # ("np", dtype, bytes): a numpy scalar


def read(f):
    head = f.read(8)
    if len(head) < 8:
        return None
    (n,) = struct.unpack("<Q", head)
    return In(io.BytesIO(f.read(n))).load()


def write(f, value) -> None:
    buf = io.BytesIO()
    Out(buf, protocol=4).dump(value)
    f.write(struct.pack("<Q", buf.tell()) + buf.getvalue())
    f.flush()


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")   # the answers; anything printed goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    while (request := read(inp)) is not None:
        released, op, args, kwargs = request
        for handle in released:
            entry = objects[handle]
            entry[1] -= 1
            if entry[1] == 0:
                del objects[handle]
        try:
            answer = ("ok", OPERATIONS[op](*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - reported to the caller
            answer = ("err", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        try:
            write(out, answer)
        except Exception as e:  # noqa: BLE001
            write(out, ("err", f"answer not sendable: {type(e).__name__}: {e}"))


if __name__ == "__main__":
    main()
