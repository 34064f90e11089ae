"""The custom-call layer of xyjax: the compiled library ``libxyjax_ffi`` (C++ handlers for jax.ffi) and the
tile contract's C header (``include/xyjax/tile_contract.h``, mirrored in ``xyjax.ops.attention.contract``)."""

from __future__ import annotations

import ctypes
import os
import threading
from importlib import metadata
from pathlib import Path

__all__ = ["ABI_VERSION", "LIBRARY_NAME", "include_dir", "library_path", "load", "register_ffi_target"]

ABI_VERSION = 1
"""XYJAX_TILE_ABI_VERSION: bumped whenever the field list or the mask kinds change."""

LIBRARY_NAME = "libxyjax_ffi.so"
_ENV_OVERRIDE = "XYJAX_FFI_LIBRARY"


def include_dir() -> Path:
    """The directory holding ``xyjax/tile_contract.h`` (for builds against the contract)."""
    return Path(__file__).resolve().parent / "include"


def _candidates() -> list[Path]:
    """Places the built library may be, most specific first."""
    found: list[Path] = []
    if os.environ.get(_ENV_OVERRIDE):
        return [Path(os.environ[_ENV_OVERRIDE])]
    # Regular install: next to this file. Editable install (scikit-build-core redirect mode):
    # __path__ lists the CMake install tree in site-packages besides the source tree.
    for entry in list(globals().get("__path__", [])) + [str(Path(__file__).parent)]:
        found.append(Path(entry) / LIBRARY_NAME)
    # The source tree imported directly (e.g. from the repo root) while the project is installed.
    try:
        located = metadata.distribution("xyjax").locate_file(f"ascend_ffi/{LIBRARY_NAME}")
        found.append(Path(str(located)))
    except metadata.PackageNotFoundError:
        pass
    unique: list[Path] = []
    for path in found:
        if path not in unique:
            unique.append(path)
    return unique


def library_path() -> Path:
    """Path of the built ``libxyjax_ffi.so``; FileNotFoundError names every place looked at.

    The environment variable XYJAX_FFI_LIBRARY, when set, names the library directly.
    """
    candidates = _candidates()
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"{LIBRARY_NAME} not found (looked at: {looked}). It is built by the package build: "
        "run `pip install -e .` (or `make run` / `make test`) in the repository root."
    )


_LIBRARY: ctypes.CDLL | None = None


def load() -> ctypes.CDLL:
    """Load ``libxyjax_ffi`` once (ctypes), with the argument types of its contract functions.

    Raises FileNotFoundError naming the path(s) if the library is missing, and RuntimeError if
    its ABI version differs from this module's.
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    path = library_path()
    lib = ctypes.CDLL(str(path))
    i32, cstr, i32p = ctypes.c_int32, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int32)
    signatures = {
        "xyjax_ffi_abi_version": ([], i32),
        "xyjax_tile_num_fields": ([], i32),
        "xyjax_tile_row_bytes": ([], i32),
        "xyjax_tile_field_index": ([cstr], i32),
        "xyjax_tile_field_name": ([i32], cstr),
        "xyjax_tile_num_mask_kinds": ([], i32),
        "xyjax_tile_mask_kind": ([cstr], i32),
        "xyjax_tile_mask_kind_name": ([i32], cstr),
        "xyjax_ffi_xla_api_version": ([i32p, i32p], i32),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    version = lib.xyjax_ffi_abi_version()
    if version != ABI_VERSION:
        raise RuntimeError(
            f"{path} has tile ABI version {version}, the Python side expects {ABI_VERSION}: "
            "rebuild it with `pip install -e .`."
        )
    _LIBRARY = lib
    return lib


_REGISTERED: set[tuple[str, str]] = set()
_REGISTER_LOCK = threading.Lock()


def register_ffi_target(name: str, symbol: str, platform: str = "cpu") -> str:
    """Register the XLA FFI handler ``symbol`` of ``libxyjax_ffi`` as the jax.ffi target ``name`` on
    ``platform``, once per process (later calls return at once). Returns ``name`` for ``jax.ffi.ffi_call``.

    Raises RuntimeError when the library was built without the XLA FFI headers (it has no handlers).
    """
    key = (name, platform)
    if key in _REGISTERED:
        return name
    with _REGISTER_LOCK:
        if key in _REGISTERED:
            return name
        import jax  # only the handlers need jax; the contract side of this module does not

        lib = load()
        try:
            handler = getattr(lib, symbol)
        except AttributeError:
            built_with_ffi = lib.xyjax_ffi_xla_api_version(None, None) == 1
            raise RuntimeError(
                f"{library_path()} has no handler {symbol!r}"
                + ("" if built_with_ffi else " (it was built without the XLA FFI headers)")
                + ": rebuild it with `pip install -e .`."
            ) from None
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform=platform)
        _REGISTERED.add(key)
    return name
