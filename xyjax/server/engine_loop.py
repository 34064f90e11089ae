"""The engine loop: one thread owns the Engine and runs ``Engine.step()``; asyncio handlers talk to it.

The engine is not thread-safe, so only the loop thread touches it. Handlers hand it commands through a
queue (add requests, abort them, close); it hands each request's output deltas back to the handler's
event loop with ``call_soon_threadsafe`` into the asyncio queue of that handler's ``Generation``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from xyjax.llm import LLM
from xyjax.engine.outputs import RequestOutput
from xyjax.engine.sampling_params import SamplingParams
from xyjax.engine.stats import merge
from xyjax.server.metrics import Metrics
from xyjax.server.protocol import APIError

log = logging.getLogger("xyjax.server")


class Generation:
    """The engine requests of one HTTP request (one per choice) and the queue their deltas arrive on."""

    def __init__(self, engine_loop: EngineLoop, count: int):
        self._engine_loop = engine_loop
        self.ids = [uuid.uuid4().hex for _ in range(count)]
        self._index = {rid: i for i, rid in enumerate(self.ids)}
        self._unfinished = set(self.ids)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.admitted: asyncio.Future[APIError | None] = self._loop.create_future()

    def deliver(self, out: RequestOutput) -> None:
        """Called on the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, out)

    def admit(self, error: APIError | None) -> None:
        """Called on the engine thread: the requests were queued, or ``error`` says why not."""
        self._loop.call_soon_threadsafe(lambda: self.admitted.done() or self.admitted.set_result(error))

    async def outputs(self):
        """Yields (choice index, delta) until every request finished."""
        while self._unfinished:
            out = await self._queue.get()
            if out.finished:
                self._unfinished.discard(out.request_id)
            yield self._index[out.request_id], out

    def abort(self) -> None:
        """Abort the requests still running (a no-op once all finished)."""
        if self._unfinished:
            self._engine_loop.abort(list(self._unfinished))


class EngineLoop:
    """Drives ``llm.engine`` on its own thread. ``stats`` is a snapshot of ``llm.stats`` after the last step."""

    def __init__(self, llm: LLM):
        self.llm, self.engine = llm, llm.engine
        self.metrics = Metrics(lambda: self.stats)
        self.stats = llm.stats
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._generations: dict[str, Generation] = {}     # request id -> its Generation
        self._deadline: float | None = None               # closing: abort what still runs at this time
        self._submitted = self._done = 0                  # engine requests (each written by one thread only)
        self.error: str | None = None                     # the engine failed: the loop stopped
        self._thread = threading.Thread(target=self._run, name="xyjax-engine-loop", daemon=True)

    # ---- any thread -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def load(self) -> int:
        """Engine requests submitted and not yet finished (or refused)."""
        return self._submitted - self._done

    @property
    def ready(self) -> bool:
        return self._thread.is_alive() and self._deadline is None and self.error is None

    async def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> Generation:
        """Queue the requests of one HTTP request; raises APIError if the engine refuses one (then none runs)."""
        gen = Generation(self, len(requests))
        self._submitted += len(requests)
        self._commands.put(("add", gen, requests))
        try:
            error = await gen.admitted
        except asyncio.CancelledError:
            gen.abort()
            raise
        if error:
            raise error
        return gen

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(("abort", request_ids))

    def close(self, grace_seconds: float) -> None:
        """Stop admitting requests; those in flight may finish for ``grace_seconds``, then are aborted (each
        handler then sends finish_reason "abort"). The thread ends when none is left."""
        self._commands.put(("close", time.monotonic() + grace_seconds))

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ---- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished()
                if not busy and self._deadline is not None:
                    return
                self._drain(block=not busy)
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    for rid in list(self.engine.requests):
                        self.engine.abort(rid)
                if self.engine.has_unfinished():
                    self._step()
        except Exception as e:   # an engine bug: fail every request in flight rather than hang them
            log.exception("engine loop failed")
            self.error = f"engine failure: {e!r}"
            for rid, gen in self._generations.items():
                gen.deliver(RequestOutput(request_id=rid, prompt=None, prompt_token_ids=[], token_ids=[], text="",
                                          finish_reason="error", error=self.error))
            while self._deadline is None:   # refuse what still comes (503) until closed
                self._drain(block=True)

    def _drain(self, block: bool) -> None:
        """Apply queued commands (waiting for one if ``block``)."""
        try:
            command = self._commands.get(block=block)
            while True:
                getattr(self, "_" + command[0])(*command[1:])
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _add(self, gen: Generation, requests: list[tuple[list[int], SamplingParams]]) -> None:
        if self.error or self._deadline is not None:
            gen.admit(APIError(self.error or "the server is shutting down", status=503, type="service_unavailable"))
            self._done += len(requests)
            return
        for i, (rid, (prompt, params)) in enumerate(zip(gen.ids, requests)):
            self.engine.add_request(prompt, params, request_id=rid)
            self._generations[rid] = gen
            error = self.engine.requests[rid].error   # a bad prompt finishes at once, reported by the next step
            if error:
                for other in gen.ids:
                    self.engine.abort(other)
                self._done += len(requests) - i - 1    # never added: they will not finish
                gen.admit(APIError(error))
                return
        gen.admit(None)

    def _abort(self, request_ids: list[str]) -> None:
        if not self.error:   # a failed engine is left alone
            for rid in request_ids:
                self.engine.abort(rid)

    def _close(self, deadline: float) -> None:
        self._deadline = min(deadline, self._deadline or deadline)

    def _step(self) -> None:
        outputs = self.engine.step()
        for out in outputs:
            gen = self._generations.pop(out.request_id) if out.finished else self._generations[out.request_id]
            gen.deliver(out)
            if out.finished:
                self._done += 1
                self.metrics.finished(out)
        self.stats = self.llm.stats


class Replicas:
    """Data parallelism: one ``EngineLoop`` per replica (each engine on its own devices), the interface of one loop
    to the app. A submitted HTTP request goes whole to the least-loaded replica (fewest unfinished engine
    requests); ``/metrics`` reads one registry, its engine figures summed over the replicas (``stats.merge``)."""

    def __init__(self, llms: list[LLM]):
        self.loops = [EngineLoop(llm) for llm in llms]
        self.llm, self.engine = llms[0], llms[0].engine
        self.metrics = Metrics(lambda: self.stats)
        for loop in self.loops:
            loop.metrics = self.metrics

    @property
    def stats(self) -> dict:
        return merge([loop.stats for loop in self.loops])

    @property
    def ready(self) -> bool:
        """Some replica takes requests (one whose engine failed refuses them; the others go on)."""
        return any(loop.ready for loop in self.loops)

    @property
    def error(self) -> str | None:
        return next((loop.error for loop in self.loops if loop.error), None)

    def start(self) -> None:
        for loop in self.loops:
            loop.start()

    async def submit(self, requests: list[tuple[list[int], SamplingParams]]) -> Generation:
        """``EngineLoop.submit`` on the least-loaded replica that is ready (any, to refuse, when none is)."""
        loops = [loop for loop in self.loops if loop.ready] or self.loops
        return await min(loops, key=lambda loop: loop.load).submit(requests)

    def close(self, grace_seconds: float) -> None:
        for loop in self.loops:
            loop.close(grace_seconds)

    def join(self, timeout: float | None = None) -> None:
        for loop in self.loops:
            loop.join(timeout)
