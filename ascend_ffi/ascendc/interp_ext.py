"""NumPy definitions of the asctile ops our kernels use that asctile's interpreter (pyasc-dev
1.1.1.dev20261026) lacks, registered through the interpreter's own ``override`` hook, and the scalar form of
``copy_in``. Import before the kernels, with ``ASCTILE_INTERPRET=1``.

These are this project's code, not Huawei's: each follows the op's asctile docstring (elementwise with NumPy
broadcasting, results in the operands' dtype; ``matmul`` accumulates in float32 like the cube's L0C). What the
interpreter itself provides (global tensors, ``copy_in``/``copy_out`` with their bounds clipping, ``matmul_acc``,
``exp``, the reductions, ``range``, block indices, ``+ - /`` and ``.to``) is used as shipped."""

import numpy as np
from asc.experimental.asctile.interpreter import operations  # noqa: F401  (registers the shipped overrides)
from asc.experimental.asctile.interpreter.patch import override, overrides
from asc.experimental.asctile.interpreter.types import LocalTensor, dtype_to_numpy


def _data(x):
    return x.data if isinstance(x, LocalTensor) else x


def _ints(shape):
    return tuple(int(s) for s in shape)


_copy_in = overrides["copy_in"]


def copy_in(src, offsets, shape=None, *args, **kwargs):
    """The shipped copy_in, plus its scalar form (no shape: the one element at ``offsets``)."""
    if shape is None:
        return src.data[tuple(int(o) for o in offsets)].item()
    return _copy_in(src, offsets, shape, *args, **kwargs)


overrides["copy_in"] = copy_in


@override("full")
def full(shape, value, dtype=None):
    return LocalTensor(np.full(_ints(shape), value, dtype=dtype_to_numpy(dtype) if dtype else None))


@override("zeros")
def zeros(shape, dtype):
    return LocalTensor(np.zeros(_ints(shape), dtype_to_numpy(dtype)))


@override("where")
def where(mask, src0, src1):
    out = np.where(_data(mask), _data(src0), _data(src1))
    like = next((x.data.dtype for x in (src0, src1) if isinstance(x, LocalTensor)), out.dtype)
    return LocalTensor(out.astype(like))


@override("maximum")
def maximum(a, b):
    return LocalTensor(np.maximum(_data(a), _data(b)))


@override("log")
def log(x):
    return LocalTensor(np.log(_data(x)))


@override("matmul")
def matmul(a, b):
    return LocalTensor(_data(a).astype(np.float32) @ _data(b).astype(np.float32))


def _binary(op, swap=False):
    return lambda self, other: LocalTensor(op(_data(other), self.data) if swap else op(self.data, _data(other)))


for _name, _op in (("mul", np.multiply), ("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                   ("ge", np.greater_equal), ("ne", np.not_equal)):
    setattr(LocalTensor, f"__{_name}__", _binary(_op))
LocalTensor.__rmul__ = _binary(np.multiply, swap=True)
LocalTensor.T = property(lambda self: LocalTensor(self.data.T))
LocalTensor.reshape = lambda self, *shape: LocalTensor(self.data.reshape(_ints(shape)))
