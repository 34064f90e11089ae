"""``xyjax eval-quant``: what int8 activations (``activation_quant="int8"``) cost in quality, against the exact
float32 path on the same weights, measured as llama.cpp measures quantization (``llama-perplexity
--kl-divergence``).

Text: ``xyjax/bench/data/gpl-3.0.txt``, the GNU GPL v3 verbatim (it ships with the project, and with every Debian
system as /usr/share/common-licenses/GPL-3). Tokenized once, cut into windows of ``--ctx`` tokens whose first
token is set to BOS; each window is one prefill, and the logits of its second half are scored (the first half is
context): position j predicts token j + 1, as llama-perplexity does. Per mode: perplexity over the scored tokens;
against the exact path: the mean, p99 and max of KL(exact || mode) of the next-token distributions and the top-1
agreement (the same argmax). With ``make llamacpp-env`` and a GGUF model, llama.cpp's own figures on the same text
and window size: the file as llama.cpp runs it (Q8 activations against Q4/Q8 weights) against the same weights in
float32 (an F32 GGUF written from the file with gguf's dequantization), from ``llama-perplexity``'s KL-divergence
mode; its chunks start one token later (it prepends BOS to the whole text).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from xyjax.bench.workload import write_result

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gpl-3.0.txt")


def windows(ids: list[int], ctx: int, bos: int | None) -> list[np.ndarray]:
    """The whole windows of ``ctx`` tokens of ``ids``, each with its first token set to ``bos`` (if any)."""
    out = []
    for start in range(0, len(ids) - ctx + 1, ctx):
        w = np.asarray(ids[start:start + ctx], np.int32)
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


def scorer(model, params, backends, ctx: int, block_size: int = 16):
    """A jitted fn(window [ctx] int32) -> log-softmax float32 [ctx - ctx // 2 - 1, V] of positions ctx // 2 ..
    ctx - 2: one prefill of the window through ``models.llama.forward`` on ``backends`` and ``params`` (held as
    the engine holds them)."""
    from models.llama import forward
    from xyjax.ops import KVCache, StepInputs
    from xyjax.ops.attention import tiling

    cfg = model.config
    pages = -(-ctx // block_size)
    first = ctx // 2
    attention = tiling.attention_metadata([0], [ctx], [ctx], np.arange(pages, dtype=np.int32)[None],
                                          num_kv_heads=cfg.num_kv_heads, tile=32, num_tokens=ctx,
                                          lanes=os.cpu_count() or 1, block_size=block_size)
    rows = np.arange(first, ctx - 1, dtype=np.int32)

    def run(params, window):
        kv = KVCache.create(cfg.num_layers, pages, block_size, cfg.num_kv_heads, cfg.head_dim, jnp.float32)
        inputs = StepInputs(token_ids=window, positions=jnp.arange(ctx, dtype=jnp.int32),
                            slot_mapping=jnp.arange(ctx, dtype=jnp.int32), num_tokens=jnp.int32(ctx),
                            attention=attention, sample_index=jnp.asarray(rows), num_samples=jnp.int32(len(rows)))
        logits, _ = forward(params, kv, inputs, cfg=cfg, backends=backends)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    step = jax.jit(run)
    return lambda window: np.asarray(step(params, jnp.asarray(window)))


def compare(exact: np.ndarray, other: np.ndarray, targets: np.ndarray) -> dict:
    """Per scored token: the other's NLL of the target, KL(exact || other), whether the argmaxes agree."""
    p = np.exp(exact.astype(np.float64))
    kl = (p * (exact.astype(np.float64) - other.astype(np.float64))).sum(-1)
    return dict(nll=-other[np.arange(len(targets)), targets].astype(np.float64), kl=np.maximum(kl, 0.0),
                top1=exact.argmax(-1) == other.argmax(-1))


def summary(per_token: dict) -> dict:
    nll, kl = np.concatenate(per_token["nll"]), np.concatenate(per_token["kl"])
    return dict(tokens=int(nll.size), perplexity=float(np.exp(nll.mean())), kl_mean=float(kl.mean()),
                kl_p99=float(np.percentile(kl, 99)), kl_max=float(kl.max()),
                top1_agreement=float(np.concatenate(per_token["top1"]).mean()))


def eval_quant(model=None, ctx: int = 512, max_windows: int | None = None, modes: tuple[str, ...] = ("none", "int8"),
               gemm_backend: str | None = None) -> dict:
    """The figures of every mode (``none``: the exact path, KL 0 by definition) over the text's windows; ``model``:
    a name or path for ``models.loader.load``, or a loaded model."""
    from models.loader import load
    from xyjax.engine.config import EngineConfig
    from xyjax.engine.engine import held_weights
    from xyjax.ops import Backends

    model = model if hasattr(model, "params") else load(model, progress=False)
    tok = model.tokenizer
    ids = tok.encode(open(TEXT, encoding="utf-8").read(), add_special_tokens=False)
    chunks = windows(ids, ctx, tok.bos_token_id)[:max_windows]
    if not chunks:
        raise ValueError(f"the text holds {len(ids)} tokens: no window of {ctx}")
    scorers = {}
    for mode in modes:
        config = EngineConfig(activation_quant=mode, gemm_backend=gemm_backend, precompile=False)
        backends = Backends(attention=config.attention_backend, gemm=config.gemm_backend)
        scorers[mode] = scorer(model, held_weights(model.params, config), backends, ctx)
    stats = {mode: dict(nll=[], kl=[], top1=[]) for mode in modes}
    for window in tqdm(chunks, desc="eval-quant windows"):
        exact = scorers["none"](window)
        targets = window[ctx // 2 + 1:]
        for mode in modes:
            for key, value in compare(exact, exact if mode == "none" else scorers[mode](window), targets).items():
                stats[mode][key].append(value)
    return dict(model=model.name, text=os.path.basename(TEXT), ctx=ctx, windows=len(chunks),
                gemm_backend=config.gemm_backend, modes={mode: summary(s) for mode, s in stats.items()})


def write_f32_gguf(src: str, dst: str) -> None:
    """``src`` with every tensor dequantized to float32 by gguf (the exact path's weights) and its metadata kept
    (``general.file_type`` set to all-F32): a file llama.cpp runs with float32 activations."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=arch)
    for field in reader.fields.values():
        if field.name in ("general.architecture", "general.file_type") or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        writer.add_tensor(tensor.name, data, raw_dtype=gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def parse_kld(text: str, ctx: int) -> dict:
    """llama-perplexity's KL-divergence report (over windows of ``ctx``) -> the figures of ``summary``."""
    def number(pattern):
        found = re.search(pattern, text)
        if not found:
            raise RuntimeError(f"llama-perplexity printed no {pattern!r}:\n{text[-3000:]}")
        return float(found.group(1))

    return dict(perplexity=number(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), kl_mean=number(r"Mean\s+KLD:\s*([-\d.]+)"),
                kl_p99=number(r"99\.0%\s+KLD:\s*([-\d.]+)"), kl_max=number(r"Maximum KLD:\s*([-\d.]+)"),
                top1_agreement=number(r"Same top p:\s*([\d.]+)") / 100,
                tokens=int(number(r"over (\d+) chunks")) * (ctx - 1 - ctx // 2))


def llamacpp_kld(bin_dir: str, gguf_path: str, ctx: int, threads: int, max_windows: int | None) -> dict:
    """llama.cpp's figures (``parse_kld``) for ``gguf_path`` against its weights in float32, on TEXT."""
    tool = os.path.join(bin_dir, "llama-perplexity")
    if not os.path.isfile(tool):
        raise FileNotFoundError(f"{tool} is missing: run make llamacpp-env")
    with tempfile.TemporaryDirectory() as tmp:
        f32, base = os.path.join(tmp, "f32.gguf"), os.path.join(tmp, "base.kld")
        write_f32_gguf(gguf_path, f32)
        # --no-repack: as the llamacpp peer (the AMX repacking segfaults on the AMX machine this was built on)
        common = ["-f", TEXT, "-c", str(ctx), "-b", str(ctx), "-t", str(threads), "--no-repack"]
        common += ["--chunks", str(max_windows)] if max_windows else []
        for cmd in ([tool, "-m", f32, *common, "--kl-divergence-base", base],
                    [tool, "-m", gguf_path, *common, "--kl-divergence-base", base, "--kl-divergence"]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        return dict(parse_kld(done.stdout + done.stderr, ctx), command=cmd)


def table(results: dict) -> str:
    lines = ["| system | scored tokens | perplexity | mean KL | p99 KL | max KL | top-1 agreement |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['tokens']} | {r['perplexity']:.4f} | {r['kl_mean']:.6f} | {r['kl_p99']:.6f} "
                     f"| {r['kl_max']:.4f} | {100 * r['top1_agreement']:.2f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xyjax eval-quant", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="known name, .gguf path or HF directory (default model)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (the second half is scored)")
    parser.add_argument("--max-windows", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--gemm-backend", default=None, help="the engine option gemm_backend (default: ffi on CPU)")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON result")
    args = parser.parse_args(argv)
    result = eval_quant(args.model, args.ctx, args.max_windows, gemm_backend=args.gemm_backend)
    systems = {f"xyjax {mode}": r for mode, r in result["modes"].items()}
    result["skipped"] = {}
    try:
        from xyjax.bench.peers import PeerUnavailable, gguf_file, llamacpp_bin
        from models.loader import load

        gguf_path = gguf_file(args.model, load(args.model, progress=False))
        systems["llama.cpp"] = result["llama.cpp"] = llamacpp_kld(
            llamacpp_bin(), gguf_path, args.ctx, len(os.sched_getaffinity(0)), args.max_windows)
    except (PeerUnavailable, RuntimeError, FileNotFoundError) as e:
        result["skipped"]["llama.cpp"] = str(e)
        print(f"xyjax eval-quant: skipping llama.cpp: {e}")
    print(table(systems))
    write_result(args.out, "eval-quant", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
