"""Trace the asctile kernels and translate them to AscendC C++ on a CPU (no CANN, no compiler, no NPU).

Runs in the pyasc-dev venv (``make ascend-env``): ``.venv-asctile/bin/python ascend_ffi/ascendc/translate.py``
rewrites ``generated/``; ``--check`` translates afresh and fails if the tree copy differs.

The route is asctile's own ``kernel[cores](...)`` path up to the point where it would call CANN's ``bisheng``:
the JIT function's codegen (with its default options), then its ``Compiler``'s passes and the AscendC translation.
The Compiler is made without ``__init__``, which asks CANN's runtime for the SoC and looks ``bisheng`` up; the
SoC is set to Ascend910B1 instead. Each variant is one specialisation (the ConstExpr values and pointer dtypes
below), its kernel named after the variant (the file's stem), its on-chip buffers checked against the 910B's:
a CANN build compiles exactly these, with ``generated/variants.h`` for the launcher. The output is
deterministic under a fixed hash seed, which the script sets for itself."""

import argparse
import difflib
import importlib.util
import inspect
import os
import pathlib
import re
import sys

if os.environ.get("PYTHONHASHSEED") != "0":   # pyasc's codegen numbers values in set order: fix the hash seed
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

from asc._C import ir, translation
from asc.codegen.specialization import Specialization
from asc.common.compat import get_annotations
from asc.experimental.asctile.runtime.compiler import Compiler
from asc.language.core.dtype import KnownTypes
from asc.runtime.config import Platform, platform_to_arch
from asc.runtime.jit import MockTensor
from asc.runtime.launcher import get_platform_info

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "kernels"))
from meta_attention import meta_attention  # noqa: E402
from smooth_gemm import smooth_gemm  # noqa: E402

PLATFORM = Platform.Ascend910B1
F16, BF16, I32, F32 = KnownTypes.float16, KnownTypes.bfloat16, KnownTypes.int32, KnownTypes.float32


def _attention(tile, group, head_dim, block_size, max_tree, stages=4, max_kv=0):
    ptrs = [F16, F16, F16, I32, I32, I32, I32, I32, I32, I32, F32, F16, F32, F32, F32]
    sizes = [1] * 8                                    # runtime sizes: any value, they stay arguments
    consts = [tile * group, group, head_dim, block_size, max_tree + 2 * block_size, stages,
              max_kv if stages == 3 else block_size]
    return meta_attention, [MockTensor(t) for t in ptrs] + sizes + [0.125] + consts


def _gemm(dtype, m_tile, n_tile, k):
    return smooth_gemm, [MockTensor(dtype), MockTensor(dtype), MockTensor(dtype), 1, 1, 0, m_tile, n_tile,
                         GEMM_TILES.K_TILE, k]


def _load(path: pathlib.Path):
    """A module of xyjax by file (this venv cannot import xyjax: it has no jax); it must need only the stdlib."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEMM_TILES = _load(HERE.parent.parent / "xyjax" / "ops" / "gemm" / "ascend_tiling.py")
# file stem -> (kernel, example arguments). Attention: head_dim 128 with xyjax's default cache block (16) and
# tiles (1 and 16 rows), for multi-head attention (Llama-2-7B, the paper's Fig. 7c model: one query head per KV
# head) and, decode only, 4 query heads per KV head; a tree of up to 64 tokens; the 3-stage form for tasks of up to
# 2048 KV positions. Larger specialisations (16-row
# tiles with 4 heads per KV head, or cache blocks of 128) exceed a 910B's 192 KiB UB as asctile allocates them.
# GEMM: every tile shape the host may pick, for K = 4096 (a 7B hidden size; other K are other specialisations).
VARIANTS = {
    "meta_attention_t16_g1_d128_p16": _attention(16, 1, 128, 16, 64),
    "meta_attention_t1_g1_d128_p16": _attention(1, 1, 128, 16, 64),
    "meta_attention_t1_g4_d128_p16": _attention(1, 4, 128, 16, 64),
    "meta_attention_t16_g1_d128_p16_s3_kw2048": _attention(16, 1, 128, 16, 64, stages=3, max_kv=2048),
    **{f"smooth_gemm_{name}_m{mt}_n{nt}_k4096": _gemm(dtype, mt, nt, 4096)
       for name, dtype in (("f16", F16), ("bf16", BF16)) for mt, nt in GEMM_TILES.SHAPES},
}


def translate(kernel, args) -> tuple[str, str, dict[str, int]]:
    """(AscendC C++ source, kernel type, on-chip bytes) of ``kernel`` specialised on ``args``."""
    options = kernel.extract_kwargs(kernel.codegen.options_cls, dict(kernel.default_options))
    call_args = inspect.signature(kernel.fn).bind(*args).arguments
    runtime_args, constexprs = kernel.split_args(call_args, get_annotations(kernel.fn))
    arg_types = {name: kernel.get_arg_type(value) for name, value in runtime_args.items()}
    mod = kernel._run_codegen(Specialization(arg_types, constexprs), options)
    compiler = object.__new__(Compiler)
    compiler.options = Compiler.options_cls()
    compiler.soc_version, compiler.arch, compiler.dump_dir = PLATFORM, platform_to_arch(PLATFORM), None
    compiler.preprocess_module(mod)
    compiler.run_passes(mod)
    compiler.postprocess_module(mod)
    return compiler.run_translation(mod), compiler.options.kernel_type.name, on_chip_bytes(mod)


def on_chip_bytes(mod) -> dict[str, int]:
    """Bytes of each on-chip buffer the kernel allocates (asctile's own count), checked against the platform's
    capacities as pyasc's launcher checks them before a launch."""
    used = dict(mod.op.get_dict_of_int_attr(ir.attr.memory_consumed))
    info = get_platform_info(PLATFORM)
    for key in ("UB", "L1", "L0A", "L0B", "L0C", "BT"):
        capacity = getattr(info, f"{key.lower()}_size")
        if used.get(key, 0) > capacity:
            raise RuntimeError(f"{key} overflow on {PLATFORM.value}: {used[key]} bytes used, {capacity} available")
    return used


def render(stem: str) -> str:
    kernel, args = VARIANTS[stem]
    source, kernel_type, used = translate(kernel, args)
    # one symbol per specialisation, so that every variant links into one library
    source, renamed = re.subn(rf"\b__aicore__ void {kernel.fn.__name__}\(", f"__aicore__ void {stem}(", source)
    if renamed != 1:
        raise RuntimeError(f"kernel {kernel.fn.__name__} not found once in its translation")
    header = (f"// Generated by ascend_ffi/ascendc/translate.py from kernels/{kernel.fn.__module__}.py: do not edit.\n"
              f"// asctile -> AscendC for {PLATFORM.value}, kernel type {kernel_type}, on-chip bytes "
              f"{', '.join(f'{k} {v}' for k, v in sorted(used.items()) if v)}. Not compiled or run here\n"
              f"// (no CANN, no NPU); CMake builds it where ASCEND_HOME_PATH is set.\n")
    return header + source


def variants_header() -> str:
    """generated/variants.h: the launch headers CANN's ascendc_library makes for every kernel, and X-macro tables
    of the specialisations (host/launch.cc dispatches on them)."""
    gemm, attention = [], []
    for stem, (kernel, args) in VARIANTS.items():
        if kernel is smooth_gemm:
            dtype = 1 if args[0].dtype == BF16 else 0
            gemm.append(f"  X({dtype}, {args[6]}, {args[7]}, {args[9]}, {stem})")
        else:
            r, g, d, p, mtw, stages, kw = args[-7:]
            attention.append(f"  X({r // g}, {g}, {d}, {p}, {mtw}, {stages}, {kw}, {stem})")
    lines = ["// Generated by ascend_ffi/ascendc/translate.py: do not edit.", "#pragma once"]
    lines += [f'#include "aclrtlaunch_{stem}.h"' for stem in VARIANTS]
    lines += ["// X(dtype (0 float16, 1 bfloat16), m_tile, n_tile, K, kernel)",
              "#define XYJAX_ASCEND_GEMM_VARIANTS(X) \\"]
    lines += [f"{row} \\" for row in gemm[:-1]] + [gemm[-1]]
    lines += ["// X(tile, group, head_dim, block_size, tree_cols, stages, score_cols, kernel)",
              "#define XYJAX_ASCEND_ATTENTION_VARIANTS(X) \\"]
    lines += [f"{row} \\" for row in attention[:-1]] + [attention[-1]]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated/ differs from a fresh translation")
    args = parser.parse_args()
    stale = []
    outputs = {f"{stem}.cpp": lambda stem=stem: render(stem) for stem in VARIANTS}
    outputs["variants.h"] = variants_header
    for name, make in outputs.items():
        path = HERE / "generated" / name
        fresh = make()
        if args.check:
            old = path.read_text() if path.exists() else ""
            if old != fresh:
                stale.append(name)
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), fresh.splitlines(True),
                                                           str(path), "fresh", n=1))
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text(fresh)
            print(f"wrote {path.relative_to(HERE.parent.parent)}")
    if stale:
        print(f"stale: {', '.join(stale)}; regenerate with .venv-asctile/bin/python ascend_ffi/ascendc/translate.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
