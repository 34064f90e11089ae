"""EngineStats: the one owner of the engine's counters; ``snapshot()`` is what ``LLM.stats`` returns.

The scheduler records preemptions, prefix-cache figures and (postprocessing a step) generated tokens,
speculation and finishes; the runner records compilations; the engine records start-up time and, through a
``StepTimer``, each step's times and tokens. Live figures (queues, KV blocks) come from ``gauges`` at
snapshot time; the scheduler provides them.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Callable


@dataclasses.dataclass
class EngineStats:
    """Counters since start. Times (seconds) of the steps that ran: ``step_seconds`` plan + run,
    ``host_plan_seconds`` draft + schedule + plan, ``device_seconds`` the jitted step (with transfers),
    ``host_output_seconds`` postprocessing and output deltas."""

    steps: int = 0
    step_seconds: float = 0.0
    host_plan_seconds: float = 0.0
    device_seconds: float = 0.0
    host_output_seconds: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    verify_tokens: int = 0
    spec_verify_runs: int = 0
    spec_drafted_tokens: int = 0
    spec_accepted_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    finished: int = 0
    errors: int = 0
    aborted: int = 0
    compiles: int = 0                    # step programs compiled or loaded from the persistent cache
    compile_seconds: float = 0.0
    startup_seconds: float = 0.0
    weight_bytes: int = 0                # the params as the runner holds them (after prepare_weights)
    activation_quant: str = "none"       # the engine's mode (EngineConfig.activation_quant)
    prefix_lookups: int = 0              # admissions that looked up the prefix cache
    prefix_lookup_tokens: int = 0
    prefix_hit_tokens: int = 0
    prefix_block_hit_tokens: int = 0     # the hits rounded down to whole blocks
    prefix_copies: int = 0               # copy-on-write copies of a partial last block
    prefix_evicted_blocks: int = 0
    gauges: Callable[[], dict] = dataclasses.field(default=dict, repr=False, compare=False)

    def snapshot(self) -> dict:
        """Every counter, the derived figures and the gauges (``LLM.stats`` documents the keys)."""
        s = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "gauges"}
        steps = max(self.steps, 1)
        return dict(s, mean_step_time=self.step_seconds / steps, tokens_per_step=self.real_tokens / steps,
                    padding_ratio=self.padded_tokens / max(self.real_tokens, 1),
                    spec_acceptance_rate=self.spec_accepted_tokens / max(self.spec_drafted_tokens, 1),
                    spec_mean_accepted_length=1 + self.spec_accepted_tokens / max(self.spec_verify_runs, 1),
                    prefix_cache_hit_rate=self.prefix_hit_tokens / max(self.prefix_lookup_tokens, 1),
                    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **self.gauges())


def merge(snapshots: list[dict]) -> dict:
    """One snapshot over data-parallel replicas (``snapshot()`` dicts): counters and gauges summed, the derived
    figures recomputed from the sums (one process: its peak RSS)."""
    names = {f.name for f in dataclasses.fields(EngineStats)} - {"gauges", "activation_quant"}
    derived = set(EngineStats().snapshot()) - names      # no gauges: the counters' keys and the derived figures
    gauges = sorted(set(snapshots[0]) - derived - names)
    total = EngineStats(activation_quant=snapshots[0]["activation_quant"],
                        **{name: sum(s[name] for s in snapshots) for name in names})
    total.gauges = lambda: {name: sum(s[name] for s in snapshots) for name in gauges}
    return total.snapshot()


class StepTimer:
    """One ``Engine.step``'s marks, folded into ``stats``: created as the step begins, then ``scheduled``,
    ``planned``, ``ran`` (with the batch and its bucket) and ``done`` as it goes; a step with nothing scheduled
    records nothing."""

    def __init__(self, stats: EngineStats):
        self.stats, self.begin, self.end_of_run = stats, time.perf_counter(), None

    def scheduled(self) -> None:
        self.start = time.perf_counter()

    def planned(self) -> None:
        self.end_of_plan = time.perf_counter()

    def ran(self, batch, bucket: int) -> None:
        """The jitted step of ``batch`` (a ScheduledBatch) padded to ``bucket`` tokens returned."""
        s, self.end_of_run = self.stats, time.perf_counter()
        s.steps += 1
        s.step_seconds += self.end_of_run - self.start
        s.real_tokens += batch.num_tokens
        s.padded_tokens += bucket - batch.num_tokens
        for seq in batch.seqs:
            name = f"{seq.stage.name.lower()}_tokens"
            setattr(s, name, getattr(s, name) + seq.num_tokens)
        s.host_plan_seconds += self.end_of_plan - self.begin
        s.device_seconds += self.end_of_run - self.end_of_plan

    def done(self) -> None:
        if self.end_of_run is not None:
            self.stats.host_output_seconds += time.perf_counter() - self.end_of_run
