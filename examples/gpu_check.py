"""xyjax on one NVIDIA GPU in one run: the Pallas kernels against the xla oracle, greedy engine output against the
CPU's, and the benchmarks of issue 27, each section in its own process with its own time limit, so a failure or
a hang in one still leaves the others' results.

    python examples/gpu_check.py OUT_DIR              # on the GPU machine (see README, "On an NVIDIA GPU")
    python examples/gpu_check.py OUT_DIR --dry-run    # anywhere: tiny shapes, kernels in Pallas' interpreters

Sections, one JSON file each under OUT_DIR (plus summary.json and log.txt: 7 files):
  env        jax / jaxlib versions, devices, the Pallas lowering the backends pick, which optional packages import.
  attention  Meta-Attention on the default model's heads (H 9, Hkv 3, D 64, blocks of 16, bfloat16) for the
             Fig. 7 batch, a lognormal-workload step (48 decodes + prefill chunks filling a 512-token budget) and the
             decode-heavy batch: the pallas backend on the Mosaic GPU kernel and on the Triton-style kernel, and
             the xla backend, each checked against the xla backend in float32 (rel. L2 error); timed beside
             ``jax.nn.dot_product_attention`` stage by stage (one padded call per stage P / V / D over KV gathered
             from the paged cache) with implementation "cudnn" and XLA's own.
  gemm       SmoothGEMM at the default model's five linear shapes (weights [N, K], bfloat16) for m rows of the
             engine's bucket T (the smallest of 16, 32, ..., 512 holding m), m over 1..512: the Mosaic GPU and
             Triton-style kernels (m traced), an XLA dot on the padded bucket (the xla backend) and an XLA dot on
             exactly m rows (one program per m); errors against a float32 reference, rows >= m checked zero.
  engine     greedy output (token ids) of the engine on a GPU, backends xla and pallas, float32 (matmuls at
             "highest" precision) and bfloat16, for two random-weight models (the tests' tiny model, head_dim 16:
             the Triton-style kernels; a small one with head_dim 64: the Mosaic GPU kernels in bfloat16), against
             the same engine on this machine's CPU backend (xla backends, a subprocess with JAX_PLATFORMS=cpu).
  bench      ``xyjax bench``'s lognormal workload of 64 requests (the engine part of ``xyjax bench
             --num-requests 64``) on random weights in the default model's shapes (SmolLM2-135M: its 98 MB GGUF
             does not fit the 64 MiB a device run carries; the cost of a step depends only on the shapes), for
             pallas and xla in bfloat16 and float32: total and output tok/s, TTFT, TPOT, compiles during the run.

``--dry-run`` runs the same code on CPU at tiny sizes with the kernels in Pallas' interpreters (Mosaic GPU's
simulates TMA and barriers), cuDNN left out; tests/engine/test_gpu_check.py runs it so it cannot rot. Results are
what the run measured; nothing is compared with a stored figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]      # the source tree; tests/helpers.py (tiny model, tokenizer)

SECTIONS = ("env", "attention", "gemm", "engine", "bench")
# seconds per section: at most 300 s in all, so one run and a rerun fit a 15-minute lease with the machine's starts;
# each section keeps what it measured when stopped. On CPU (--dry-run) the interpreters are slow, the shapes tiny.
TIMEOUTS = {"env": 20, "attention": 45, "gemm": 45, "engine": 70, "bench": 120}
DRY_TIMEOUTS = {"env": 60, "attention": 150, "gemm": 120, "engine": 150, "bench": 120}
GEMM_SHAPES = {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576), "o": (576, 576),
               "lm_head": (576, 49152)}   # (K, N) of the default model; weights [N, K] (transpose_w) as the engine's
BUCKETS = (16, 32, 64, 128, 256, 512)
M_VALUES = (1, 2, 4, 8, 16, 24, 32, 64, 96, 128, 256, 384, 512)
TOLERANCE = 1e-2    # relative L2 error that passes with bfloat16 operands and float32 accumulation


class Result:
    """A section's JSON file, rewritten after every update so a section stopped at its time limit keeps what it
    measured."""

    def __init__(self, out_dir: str, section: str):
        self.path = os.path.join(out_dir, f"{section}.json")
        self.data = {"section": section, "status": "running"}
        self.save()

    def save(self):
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)

    def add(self, key, value):
        self.data[key] = value
        self.save()


def rel_error(out, ref) -> float:
    import numpy as np
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def timed(fn, *args, dry: bool) -> float:
    """ms per call: the best of 5 rounds of 10 after a warm-up (``xyjax.bench.attention.timeit``); in a dry run one
    call (already compiled by the error check before it)."""
    import jax

    from xyjax.bench.attention import timeit
    if not dry:
        return 1e3 * timeit(fn, *args, repeat=5, number=10)
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return 1e3 * (time.perf_counter() - start)


def lowerings(dry: bool) -> dict:
    return {"mosaic": "mosaic_interpret", "triton": "interpret"} if dry else {"mosaic": "mosaic", "triton": "triton"}


# ---- sections ----------------------------------------------------------------------------------------------------
def section_env(res: Result, dry: bool):
    import importlib

    import jax
    import jaxlib

    from xyjax.ops import pallas_lowering

    res.add("python", platform.python_version())
    res.add("jax", jax.__version__)
    res.add("jaxlib", jaxlib.__version__)
    res.add("default_backend", jax.default_backend())
    res.add("devices", [dict(kind=d.device_kind, platform=d.platform,
                             compute_capability=str(getattr(d, "compute_capability", None))) for d in jax.devices()])
    res.add("pallas_lowering", pallas_lowering.default_lowering())
    found = {}
    for name in ("gguf", "llguidance", "tokenizers", "flax", "chex", "triton", "torch"):
        try:
            found[name] = getattr(importlib.import_module(name), "__version__", "yes")
        except Exception as e:   # noqa: BLE001 - a report, not a check
            found[name] = f"missing: {e}"
    res.add("packages", found)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        res.add("nvidia_smi", subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout)


def attention_mixes(dry: bool) -> dict:
    """Hybrid batches [(stage, query rows, history)]."""
    import numpy as np

    from xyjax.bench.attention import CASES
    from xyjax.bench.workload import WORKLOADS, make_requests

    if dry:
        return {"fig7-tiny": [("P", 20, 10), ("V", 5, 30), ("D", 1, 40)]}
    requests = make_requests(dataclasses.replace(WORKLOADS["lognormal"], num_requests=64), 49152)
    rng = np.random.default_rng(0)
    mix = [("D", 1, len(r.prompt_token_ids) + int(rng.integers(0, r.output_len))) for r in requests[:48]]
    room = 512 - len(mix)
    for r in requests[48:]:
        if room <= 0:
            break
        chunk = min(room, len(r.prompt_token_ids))
        mix.append(("P", chunk, 0))
        room -= chunk
    return {"fig7": CASES["fig7"], "lognormal": mix, "decode-heavy": CASES["decode-heavy"]}


def section_attention(res: Result, dry: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xyjax.bench.attention import BS, HKV, dense_attention, make_case
    from xyjax.ops import meta_attention
    from xyjax.ops.attention import tiling
    from xyjax.ops.attention.pallas import meta_attention_pallas
    from xyjax.ops.kv_cache import KVCache

    rng = np.random.default_rng(0)
    cases = {}
    for name, seqs in attention_mixes(dry).items():
        q, kv, q_start, q_len, kv_len, tables = make_case(seqs, rng, sum(-(-(a + b) // BS) for _, a, b in seqs) + 8)
        # the engine's tiling, balanced over the H100's 132 SMs (a CTA per task) with up to 4 KV splits a task
        meta = tiling.attention_metadata(q_start, q_len, kv_len, tables, num_kv_heads=HKV, tile=32, block_size=BS,
                                         lanes=1 if dry else 132, max_splits=1 if dry else 4)
        qb, kvb = q.astype(jnp.bfloat16), KVCache(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))
        with jax.default_matmul_precision("highest"):    # the oracle: the xla backend on the bf16 values in f32
            oracle = jax.jit(lambda q, kv, m: meta_attention(q, kv, 0, m, backend="xla"))(
                qb.astype(jnp.float32), KVCache(k=kvb.k.astype(jnp.float32), v=kvb.v.astype(jnp.float32)), meta)
        case = dict(sequences=len(seqs), stages={s: sum(1 for t, _, _ in seqs if t == s) for s in "PVD"},
                    tasks=[int(g.num_tasks) for g in meta.groups],
                    query_rows=int(q_len.sum()), kv_positions=int(kv_len.sum()), ms={}, rel_error={}, errors={})
        systems = {f"pallas-{k}": jax.jit(lambda q, kv, m, lo=lo: meta_attention_pallas(q, kv, 0, m, lowering=lo))
                   for k, lo in lowerings(dry).items()}
        systems["xla-backend"] = jax.jit(lambda q, kv, m: meta_attention(q, kv, 0, m, backend="xla"))
        for label, fn in systems.items():
            try:
                case["rel_error"][label] = rel_error(fn(qb, kvb, meta), oracle)
                case["ms"][label] = timed(fn, qb, kvb, meta, dry=dry)
            except Exception as e:   # noqa: BLE001 - recorded, the other systems still run
                case["errors"][label] = f"{type(e).__name__}: {e}"[:2000]
        labels = np.array([stage for stage, _, _ in seqs])
        stages = [np.flatnonzero(labels == stage) for stage in "PVD"]
        for impl in (None,) if dry else (None, "cudnn"):
            label = f"stage-by-stage-{impl or 'xla'}"
            try:
                case["ms"][label] = timed(dense_attention(qb, kvb, q_start, q_len, kv_len, tables, stages, impl),
                                          dry=dry)
            except Exception as e:   # noqa: BLE001
                case["errors"][label] = f"{type(e).__name__}: {e}"[:2000]
        base = case["ms"].get("stage-by-stage-cudnn")
        if base and "pallas-mosaic" in case["ms"]:
            case["speedup_mosaic_vs_cudnn_stages"] = base / case["ms"]["pallas-mosaic"]
        case["pass"] = all(e <= TOLERANCE for e in case["rel_error"].values()) and not any(
            k.startswith("pallas") for k in case["errors"])
        cases[name] = case
        res.add("cases", cases)


def section_gemm(res: Result, dry: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from xyjax.ops import smooth_gemm
    from xyjax.ops.gemm import pallas as gemm_pallas

    shapes = {"tiny": (64, 128)} if dry else GEMM_SHAPES
    m_values = (1, 5, 16) if dry else M_VALUES
    rng = np.random.default_rng(0)
    out = {}
    for name, (K, N) in shapes.items():
        w = jnp.asarray(rng.standard_normal((N, K)) / np.sqrt(K), jnp.bfloat16)
        x_full = jnp.asarray(rng.standard_normal((max(BUCKETS), K)), jnp.bfloat16)
        fns = {f"pallas-{k}": jax.jit(lambda x, w, m, lo=lo: gemm_pallas.gemm(x, w, m, None, True, {}, lowering=lo))
               for k, lo in lowerings(dry).items()}
        fns["xla-padded"] = jax.jit(lambda x, w, m: smooth_gemm(x, w, m, transpose_w=True, backend="xla"))
        exact = jax.jit(lambda x, w: x @ w.T)
        rows, shape_ok = [], True
        for m in m_values:
            T = next(b for b in BUCKETS if b >= m)
            x = x_full[:T]
            ref = np.asarray(x[:m], np.float32) @ np.asarray(w, np.float32).T
            row = dict(m=m, bucket=T, ms={}, rel_error={}, errors={})
            for label, fn in fns.items():
                try:
                    y = np.asarray(fn(x, w, m), np.float32)
                    row["rel_error"][label] = rel_error(y[:m], ref)
                    row["rows_past_m_zero"] = row.get("rows_past_m_zero", True) and not y[m:].any()
                    row["ms"][label] = timed(fn, x, w, m, dry=dry)
                except Exception as e:   # noqa: BLE001
                    row["errors"][label] = f"{type(e).__name__}: {e}"[:2000]
            row["ms"]["xla-exact-m"] = timed(exact, x[:m], w, dry=dry)
            shape_ok &= all(e <= TOLERANCE for e in row["rel_error"].values()) and row.get("rows_past_m_zero", False) \
                and not row["errors"]
            rows.append(row)
            out[name] = dict(K=K, N=N, rows=rows, pass_=shape_ok)
            res.add("shapes", out)


SMALL = dict(hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=2, head_dim=64)
PROMPTS = ([5, 300, 1200, 77, 4000], list(range(400, 437)), [9] * 3)   # 5, 37 (two prefill steps) and 3 tokens


def engine_models():
    """(name, LoadedModel) of the tests' tiny random model and a small one with head_dim 64 (same seed, tokenizer)."""
    import jax
    from helpers import TINY, tiny_model
    from models.llama import init_params

    tiny = tiny_model()
    cfg = dataclasses.replace(TINY, **SMALL)
    small = dataclasses.replace(tiny, name="small", config=cfg, params=init_params(cfg, jax.random.key(0), scale=0.2))
    return [("tiny", tiny), ("small", small)]


def greedy(model, dtype: str, backend: str, max_tokens: int) -> list[list[int]]:
    import jax
    import jax.numpy as jnp

    from xyjax import LLM, SamplingParams

    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), model.params)
    model = dataclasses.replace(model, params=params, dtype=jnp.dtype(dtype))
    llm = LLM(model, progress=False, attention_backend=backend, gemm_backend=backend, max_num_batched_tokens=32,
              token_buckets=(32,), max_num_seqs=4, kv_cache_memory=1 << 24, max_model_len=128)
    outs = llm.generate(list(PROMPTS), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    return [list(o.token_ids) for o in outs]


def engine_runs(dry: bool) -> list[tuple[str, str, str]]:
    """(model, dtype, backend) of the engine section; a dry run only exercises the code (the pallas engine paths on
    CPU are tested by the test suite)."""
    if dry:
        return [("tiny", "float32", "xla")]
    return [(m, d, b) for m in ("tiny", "small") for d in ("float32", "bfloat16") for b in ("xla", "pallas")]


def section_engine_cpu_reference(res: Result, dry: bool):
    """(run as a CPU-only subprocess of the engine section) the reference outputs: xla backends."""
    models = dict(engine_models())
    for name, dtype in dict.fromkeys((m, d) for m, d, _ in engine_runs(dry)):
        res.add(f"{name}/{dtype}", greedy(models[name], dtype, "xla", 6 if dry else 16))


def section_engine(res: Result, dry: bool):
    import jax

    ref_dir = tempfile.mkdtemp()
    cpu = subprocess.Popen([sys.executable, __file__, ref_dir, "--section", "engine_cpu_reference"]
                           + (["--dry-run"] if dry else []), env=dict(os.environ, JAX_PLATFORMS="cpu"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gpu, models = {}, dict(engine_models())
    for name, dtype, backend in engine_runs(dry):
        key = f"{name}/{dtype}/{backend}"
        start = time.perf_counter()
        try:
            exact = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
            with exact:
                gpu[key] = dict(tokens=greedy(models[name], dtype, backend, 6 if dry else 16))
        except Exception as e:   # noqa: BLE001
            gpu[key] = dict(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
        gpu[key]["seconds"] = time.perf_counter() - start
        res.add("runs", gpu)
    log, _ = cpu.communicate()     # the section's time limit bounds the wait
    if cpu.returncode:
        res.add("cpu_reference_log", log[-3000:])
    with open(os.path.join(ref_dir, "engine_cpu_reference.json")) as f:
        ref = json.load(f)
    res.add("cpu_reference", {k: v for k, v in ref.items() if "/" in k})
    for key, run in gpu.items():
        expect = ref.get(key.rsplit("/", 1)[0])
        if "tokens" in run and expect:
            # float32 must match; bfloat16 greedy on random weights may part at near-ties (rounding order differs)
            run["equal_to_cpu"] = run["tokens"] == expect
            run["must_equal"] = key.split("/")[1] == "float32"
            run["first_difference"] = [next((i for i, (a, b) in enumerate(zip(g, c)) if a != b), None)
                                       for g, c in zip(run["tokens"], expect)]
    res.add("runs", gpu)


SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                    num_kv_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=9.999999747378752e-06,
                    max_position_embeddings=8192, tie_word_embeddings=True)   # the default model's config


def section_bench(res: Result, dry: bool):
    import jax
    import jax.numpy as jnp

    from helpers import TINY, tiny_tokenizer
    from models.config import ModelConfig
    from models.llama import init_params
    from models.loader import LoadedModel
    from xyjax import LLM
    from xyjax.bench.runs import run_systems
    from xyjax.bench.workload import WORKLOADS, make_requests

    cfg = TINY if dry else ModelConfig(**SMOLLM2_135M)
    workload = dataclasses.replace(WORKLOADS["lognormal"], num_requests=4 if dry else 64)
    if dry:
        workload = dataclasses.replace(workload, prompt_median=8, prompt_max=24, output_median=4, output_max=8)
    requests = make_requests(workload, cfg.vocab_size)
    res.add("model", dict(dataclasses.asdict(cfg), weights="random (seed 0): the cost of a step depends on shapes only"))
    res.add("workload", dataclasses.asdict(workload))
    tokenizer = tiny_tokenizer()
    runs = {}
    configs = [("float32", "xla")] if dry else [("bfloat16", "pallas"), ("bfloat16", "xla"), ("float32", "pallas"),
                                                 ("float32", "xla")]   # most wanted first: a timeout cuts the last
    for dtype, backend in configs:
        key = f"{dtype}/{backend}"
        try:
            params = init_params(cfg, jax.random.key(0), dtype=jnp.dtype(dtype))
            model = LoadedModel(name="smollm2-135m-shaped-random", config=cfg, params=params, tokenizer=tokenizer,
                                dtype=jnp.dtype(dtype))
            start = time.perf_counter()
            llm = LLM(model, progress=False, attention_backend=backend, gemm_backend=backend,
                      **(dict(max_num_batched_tokens=16, max_num_seqs=4) if dry else {}))
            startup = time.perf_counter() - start
            systems, _ = run_systems(requests, llm, (), (), None, progress=False)
            figures = {k: v for k, v in systems["xyjax"].items() if k != "records"}
            runs[key] = dict(figures, startup_seconds=startup, lowering=_lowering_of(backend))
        except Exception as e:   # noqa: BLE001
            runs[key] = dict(error=f"{type(e).__name__}: {e}"[:2000], trace=traceback.format_exc()[-2000:])
        res.add("runs", runs)


def _lowering_of(backend: str) -> str | None:
    from xyjax.ops import pallas_lowering
    return pallas_lowering.default_lowering() if backend == "pallas" else None


SECTION_FNS = {"env": section_env, "attention": section_attention, "gemm": section_gemm, "engine": section_engine,
               "bench": section_bench, "engine_cpu_reference": section_engine_cpu_reference}


# ---- driver --------------------------------------------------------------------------------------------------------
def run_section(name: str, out_dir: str, dry: bool) -> int:
    """In this (child) process: one section, its JSON under out_dir."""
    res = Result(out_dir, name)
    res.add("dry_run", dry)
    start = time.perf_counter()
    try:
        SECTION_FNS[name](res, dry)
        res.data["status"] = "done"
        return 0
    except Exception as e:   # noqa: BLE001 - the file says what failed
        res.data.update(status="failed", error=f"{type(e).__name__}: {e}"[:3000], trace=traceback.format_exc()[-4000:])
        return 1
    finally:
        res.data["seconds"] = time.perf_counter() - start
        res.save()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, kernels in Pallas' interpreters")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--section", help=argparse.SUPPRESS)   # internal: run one section in this process
    args = parser.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    if args.section:
        return run_section(args.section, args.out_dir, args.dry_run)
    chosen = [s for s in args.only.split(",") if s]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    limits = DRY_TIMEOUTS if args.dry_run else TIMEOUTS
    summary = {}
    with open(os.path.join(args.out_dir, "log.txt"), "a") as log:
        for name in chosen:
            start = time.perf_counter()
            cmd = [sys.executable, os.path.abspath(__file__), args.out_dir, "--section", name]
            cmd += ["--dry-run"] if args.dry_run else []
            log.write(f"==== {name}: {' '.join(cmd)}\n")
            log.flush()
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = child.wait(timeout=limits[name])
                status = "done" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:   # the section and what it started (the engine's CPU reference)
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                status = f"timed out after {limits[name]} s"
                _mark(args.out_dir, name, status)
            summary[name] = dict(status=status, seconds=round(time.perf_counter() - start, 1))
            print(f"{name:10s} {status:28s} {summary[name]['seconds']:7.1f} s", flush=True)
    with open(os.path.join(args.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(report(args.out_dir, chosen))
    return 0 if all(s["status"] == "done" for s in summary.values()) else 1


def _mark(out_dir: str, name: str, status: str):
    """A section stopped at its limit: its file keeps what it wrote, with the status."""
    path = os.path.join(out_dir, f"{name}.json")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        data = {"section": name}
    data["status"] = status
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def report(out_dir: str, chosen) -> str:
    """A short table of the headline figures (the device tool returns the end of the output)."""
    lines = []

    def load(name):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(out_dir, f"{name}.json")) as f:
                return json.load(f)
        return {}

    env = load("env")
    if env:
        lines.append(f"jax {env.get('jax')} on {[d['kind'] for d in env.get('devices', [])]}, "
                     f"pallas lowering {env.get('pallas_lowering')}")
    for name, case in load("attention").get("cases", {}).items():
        ms = " | ".join(f"{k} {v:.3f}" for k, v in case["ms"].items())
        lines.append(f"attention {name}: pass={case['pass']} ms: {ms}; errors: {sorted(case['errors'])}")
    for name, shape in load("gemm").get("shapes", {}).items():
        lines.append(f"gemm {name}: pass={shape['pass_']} " + " ".join(
            f"m{r['m']}:" + "/".join(f"{v:.3f}" for v in r["ms"].values()) for r in shape["rows"][::4]))
    for key, run in load("engine").get("runs", {}).items():
        lines.append(f"engine {key}: equal_to_cpu={run.get('equal_to_cpu')} {run.get('error', '')[:200]}")
    for key, run in load("bench").get("runs", {}).items():
        lines.append(f"bench {key}: total tok/s {run.get('total_tokens_per_s', float('nan')):.1f} "
                     f"{run.get('error', '')[:200]}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
