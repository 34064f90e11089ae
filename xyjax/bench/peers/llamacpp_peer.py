"""llama.cpp's ``llama-server`` as a ``xyjax bench --compare`` peer (see protocol.py); plain Python (any
interpreter), the server built by ``make llamacpp-env``.

Starts ``llama-server`` on the GGUF file the engine loads (``--model-dir`` is that file here), one slot per
request that can run at once (``--parallel`` = the number of requests, at most ``--max-parallel``), continuous
batching on, a context of ``slots x`` the longest request (prompt + output) so no slot shifts or truncates, every
CPU as a thread, weight repacking off (``--no-repack``: its AMX buffer type segfaults in
``ggml::cpu::amx::tensor_traits::compute_forward`` on this machine's Xeon, llama.cpp 0c1e570). Waits for
``/health``, runs two warm-up requests, then sends each request from its own thread at its arrival time to ``/completion`` with the exact prompt token ids (``n_predict`` = output_len, ``temperature`` 0,
``ignore_eos``, ``cache_prompt`` off, streamed): the first streamed token gives the first-token time, the final
event (``stop``) the finish; the server's own count of predicted tokens must equal output_len. The weights are the
file's (llama.cpp computes in its kernels for the file's block formats; xyjax dequantises them to float32).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import protocol  # noqa: E402


def completion_payload(request: dict) -> dict:
    """The body of llama-server's ``POST /completion`` for a protocol request."""
    return dict(prompt=list(request["prompt_token_ids"]), n_predict=request["output_len"], temperature=0.0,
                ignore_eos=True, cache_prompt=False, stream=True, return_tokens=True, n_probs=0)


def context_size(requests: list[dict], slots: int) -> int:
    """A context for ``slots`` slots in which every request fits whole (llama-server splits it between them)."""
    longest = max(len(r["prompt_token_ids"]) + r["output_len"] for r in requests)
    return slots * (longest + 16)


def server_command(bin_dir: str, gguf: str, port: int, slots: int, ctx: int, threads: int) -> list[str]:
    return [os.path.join(bin_dir, "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(slots), "--cont-batching", "--ctx-size", str(ctx), "--threads", str(threads),
            "--threads-batch", str(threads), "--no-webui", "--no-repack"]


def sse_events(lines):
    """The JSON objects of a server-sent event stream, from its lines (bytes or str): ``(item, event)`` for each
    ``data: {...}`` line, where ``item`` is what came with the line (e.g. its arrival time)."""
    for item, line in lines:
        if isinstance(line, bytes):
            line = line.decode()
        line = line.strip()
        if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
            yield item, json.loads(line[5:])


def record(request: dict, events) -> dict:
    """A protocol record from the timed events of one streamed completion (``(time, event)``, times on the
    run's clock): the first event carrying a token is the first token, the ``stop`` event the finish."""
    first = finish = None
    tokens, predicted = [], None
    for t, event in events:
        if "error" in event:
            raise RuntimeError(f"llama-server: {event['error']}")
        new = event.get("tokens") or []
        if (new or event.get("content")) and first is None:
            first = t
        tokens += new
        if event.get("stop"):
            finish, predicted = t, event.get("tokens_predicted", len(tokens))
            break
    if finish is None or first is None:
        raise RuntimeError("llama-server: the stream ended without a token or a stop event")
    if predicted != request["output_len"]:
        raise RuntimeError(f"llama-server generated {predicted} tokens, {request['output_len']} asked")
    return dict(arrival=request["arrival"], first_token=first, finish=finish,
                prompt_len=len(request["prompt_token_ids"]), output_len=request["output_len"], output_token_ids=tokens)


def stream_completion(port: int, request: dict, t0: float) -> dict:
    """Send one request to the server and time its stream (seconds from ``t0``)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    try:
        conn.request("POST", "/completion", json.dumps(completion_payload(request)),
                     {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:2000]!r}")

        def lines():
            for line in response:   # each arrives when the server flushes it
                yield time.perf_counter() - t0, line
        return record(request, sse_events(lines()))
    finally:
        conn.close()


def run(port: int, requests: list[dict]) -> tuple[list[dict], dict]:
    """Every request from its own thread at its arrival time; records in input order and the run's figures."""
    records, errors = [None] * len(requests), []
    t0 = time.perf_counter()

    def send(i: int) -> None:
        try:
            time.sleep(max(0.0, requests[i]["arrival"] - (time.perf_counter() - t0)))
            records[i] = stream_completion(port, requests[i], t0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"request {i}: {e}")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:5]))
    return records, dict(wall_time=wall)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, log: str, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"llama-server exited ({server.returncode}):\n{open(log).read()[-4000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s:\n{open(log).read()[-4000:]}")


def version(bin_dir: str) -> str:
    done = subprocess.run([os.path.join(bin_dir, "llama-server"), "--version"], capture_output=True, text=True)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version")]
    return lines[0].split(":", 1)[1].strip() if lines else "unknown"


def main() -> None:
    p = protocol.parser(__doc__.split("\n\n")[0])
    p.add_argument("--bin-dir", required=True, help="directory holding llama-server")
    p.add_argument("--max-parallel", type=int, default=64, help="most slots (default 64)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: every usable CPU")
    args = p.parse_args()
    requests = protocol.read_requests(args.requests)
    slots = max(1, min(len(requests), args.max_parallel))
    ctx = context_size(requests, slots)
    port = free_port()
    cmd = server_command(args.bin_dir, args.model_dir, port, slots, ctx, args.threads)
    with tempfile.NamedTemporaryFile("w", suffix=".log", delete=False) as log:
        pass
    t = time.perf_counter()
    with open(log.name, "w") as f:
        server = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_healthy(port, server, log.name)
        startup = time.perf_counter() - t
        t = time.perf_counter()
        run(port, [dict(prompt_token_ids=list(range(256, 256 + n)), output_len=8, arrival=0.0) for n in (200, 24)])
        warmup = time.perf_counter() - t
        records, stats = run(port, requests)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nllama-server log:\n{open(log.name).read()[-4000:]}") from None
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        os.unlink(log.name)
    stats.update(startup_seconds=startup, warmup_seconds=warmup)
    settings = dict(gguf=args.model_dir, parallel=slots, ctx_size=ctx, threads=args.threads, cont_batching=True,
                    cache_prompt=False, command=cmd)
    protocol.write_result(args.out, f"llama.cpp {version(args.bin_dir)} (llama-server, CPU)", settings, stats, records)


if __name__ == "__main__":
    main()
