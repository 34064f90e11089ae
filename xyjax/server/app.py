"""The FastAPI app: OpenAI's completions and chat routes (JSON or server-sent events), models, health, metrics.

Every refusal is an OpenAI error object ``{"error": {"message", "type", "param", "code"}}``: 400 for bad
input (malformed JSON, unknown model, invalid or unsupported fields, prompts over the context length),
413 for a body over the limit, 503 while shutting down. Bodies are parsed here rather than by FastAPI,
so that no bad input turns into FastAPI's 422.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import time

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from xyjax.engine.outputs import RequestOutput, merge_delta
from xyjax.server.engine_loop import EngineLoop, Generation
from xyjax.server.protocol import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   SamplingRequest, TokenizeRequest, chat_logprobs, completion_logprobs, envelope,
                                   prompt_logprobs, response_id, usage, validation_error)


def build_app(engine_loop: EngineLoop, model_name: str, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The app serving ``engine_loop`` under ``model_name``; request bodies over ``max_body_bytes`` get 413.
    Tokenizing and chat templates run in worker threads, off the event loop that streams everyone's tokens."""
    app = FastAPI(title="xyjax", docs_url=None, redoc_url=None)
    engine, tokenizer, metrics = engine_loop.engine, engine_loop.llm.tokenizer, engine_loop.metrics
    created = int(time.time())

    def decode(token_id: int) -> str:
        return tokenizer.decode([token_id])

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        metrics.rejected.labels(str(e.status)).inc()
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):   # unknown routes, wrong methods
        return await api_error(request, APIError(str(e.detail), status=e.status_code, type="invalid_request_error"))

    @app.get("/health")
    async def health():
        if not engine_loop.ready:
            raise APIError(engine_loop.error or "the server is shutting down", status=503,
                           type="service_unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "xyjax", "max_model_len": engine.max_model_len,
                                            "activation_quant": engine.config.activation_quant}]}

    async def parse(request: Request, model: type[SamplingRequest]) -> SamplingRequest:
        declared = request.headers.get("content-length", "")
        too_big = APIError(f"request body exceeds {max_body_bytes} bytes", status=413)
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise too_big
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise too_big
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(f"malformed JSON body: {e}") from None
        except RecursionError:
            raise APIError("the JSON body nests too deeply") from None
        if not isinstance(data, dict):
            raise APIError("the request body must be a JSON object")
        try:
            req = model.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model not in (None, model_name):
            raise APIError(f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return req

    def max_tokens(requested: int | None, prompt: list[int]) -> int:
        """``requested`` (None: the rest of the context), if prompt + it fit the context."""
        room = engine.max_model_len - len(prompt)
        if requested is None:
            requested = max(room, 1)
        if len(prompt) + requested > engine.max_model_len:
            raise APIError(f"the prompt ({len(prompt)} tokens) plus max_tokens ({requested}) exceed the context "
                           f"length of {engine.max_model_len} tokens", param="max_tokens")
        return requested

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompts = await asyncio.to_thread(lambda: [tokenizer.encode(p) if isinstance(p, str) else p
                                                   for p in req.prompts()])
        limits = [max_tokens(req.max_tokens, p) for p in prompts]
        return await respond(request, req, "cmpl", prompts, limits, req.logprobs)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatCompletionRequest)
        try:
            prompt = await asyncio.to_thread(tokenizer.apply_chat_template, req.conversation(),
                                             add_generation_prompt=True, tokenize=True)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(f"messages: {e}", param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await respond(request, req, "chatcmpl", [prompt], [max_tokens(requested, prompt)], req.num_logprobs)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse(request, TokenizeRequest)
        try:
            if req.messages is not None:
                tokens = await asyncio.to_thread(tokenizer.apply_chat_template, ChatCompletionRequest(
                    messages=req.messages).conversation(), add_generation_prompt=req.add_generation_prompt,
                    tokenize=True)
            else:
                tokens = await asyncio.to_thread(tokenizer.encode, req.prompt, req.add_special_tokens)
        except (ValueError, jinja2.TemplateError) as e:
            raise APIError(f"messages: {e}", param="messages") from None
        body = {"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens}
        if req.return_token_strs:
            body["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in tokens]
        return body

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await parse(request, DetokenizeRequest)
        vocab = engine.model.config.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": await asyncio.to_thread(tokenizer.decode, req.tokens)}

    @app.get("/version")
    async def version():
        return {"version": importlib.metadata.version("xyjax")}

    async def respond(request: Request, req: SamplingRequest, kind: str, prompts: list[list[int]], limits: list[int],
                      logprobs: int | None) -> Response:
        """Run n choices per prompt (choice i * n + j: prompt i, sample j) and answer as JSON or a stream."""
        requests = [(p, req.sampling_params(limit, logprobs, j)) for p, limit in zip(prompts, limits)
                    for j in range(req.n)]
        choices = _Choices(kind, response_id(kind), model_name, decode, logprobs,
                           sum(len(p) for p in prompts), echo=getattr(req, "echo", False),
                           prompt_logprobs=req.prompt_logprobs is not None, detokenize=tokenizer.decode)
        gen = await engine_loop.submit(requests)
        if req.stream:
            return _EventStream(choices.stream(gen, req.include_usage), on_close=gen.abort)
        try:
            body = await _unless_disconnected(request, choices.collect(gen))
        finally:
            gen.abort()
        return Response(status_code=499) if body is None else JSONResponse(body)   # 499: nobody to answer

    return app


async def _unless_disconnected(request: Request, work):
    """The result of ``work``, or None (with ``work`` cancelled) if the client disconnects first."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task in done else None
    finally:
        task.cancel()
        watch.cancel()


class _EventStream(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (finished, disconnected, cancelled)."""

    def __init__(self, events, on_close):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class _Choices:
    """Formats a Generation's outputs as one OpenAI response ("cmpl": completions, "chatcmpl": chat). ``echo``
    (completions): a choice's first part starts with its prompt's text and logprobs. ``prompt_logprobs``: vLLM's
    field, on each completion choice's first part, on a chat response (its first chunk when streamed)."""

    def __init__(self, kind: str, rid: str, model: str, decode, logprobs: int | None, prompt_tokens: int,
                 echo: bool, prompt_logprobs: bool, detokenize):
        self.kind, self.rid, self.model, self.decode, self.logprobs = kind, rid, model, decode, logprobs
        self.prompt_tokens, self.created = prompt_tokens, int(time.time())
        self.echo, self.prompt_logprobs, self.detokenize = echo, prompt_logprobs, detokenize

    def _choice(self, i: int, out: RequestOutput, stream: bool = False, first: bool = False,
                text_offset: int = 0) -> dict:
        """Choice ``i`` of ``out`` (``first``: its first part; ``text_offset``: characters sent before it)."""
        choice = {"index": i}
        echo = self.echo and first
        ids, entries = (out.prompt_token_ids, out.prompt_logprobs) if echo else ([], [])
        logprobs = None
        if self.logprobs is not None and (out.token_ids or echo):
            logprobs = (completion_logprobs(ids + out.token_ids, entries + out.logprobs, self.logprobs, self.decode,
                                            text_offset) if self.kind == "cmpl"
                        else chat_logprobs(out, self.logprobs, self.decode))
        if self.kind == "cmpl":
            prompt = (out.prompt if out.prompt is not None else self.detokenize(ids)) if echo else ""
            choice["text"] = prompt + out.text
            if self.prompt_logprobs and first:
                choice["prompt_logprobs"] = prompt_logprobs(out.prompt_logprobs, self.decode)
        elif stream:
            choice["delta"] = dict({"role": "assistant"} if first else {}, content=out.text)
        else:
            choice["message"] = {"role": "assistant", "content": out.text}
        return dict(choice, logprobs=logprobs, finish_reason=out.finish_reason)

    def _envelope(self, choices: list[dict], usage_: dict | None = None, stream: bool = False,
                  prompt_out: RequestOutput | None = None) -> dict:
        """The response (or chunk) around ``choices``; a chat one with the prompt logprobs of ``prompt_out``."""
        obj = ("chat.completion.chunk" if stream else "chat.completion") if self.kind == "chatcmpl" \
            else "text_completion"
        body = envelope(self.rid, obj, self.model, choices, usage_, self.created)
        if self.kind == "chatcmpl" and self.prompt_logprobs and prompt_out is not None:
            body["prompt_logprobs"] = prompt_logprobs(prompt_out.prompt_logprobs, self.decode)
        return body

    async def collect(self, gen: Generation) -> dict:
        """The whole response."""
        results: list[RequestOutput | None] = [None] * len(gen.ids)
        async for i, out in gen.outputs():
            results[i] = merge_delta(results[i], out)
        choices = [self._choice(i, out, first=True) for i, out in enumerate(results)]
        return self._envelope(choices, usage(self.prompt_tokens, sum(len(out.token_ids) for out in results)),
                              prompt_out=results[0])

    async def stream(self, gen: Generation, include_usage: bool):
        """Server-sent event chunks, then the usage chunk if asked for, then [DONE]."""
        sent: list[int | None] = [None] * len(gen.ids)   # characters streamed per choice (None: nothing yet)
        completion_tokens = 0
        async for i, out in gen.outputs():
            completion_tokens += len(out.token_ids)
            if out.text or out.token_ids or out.finished:
                first = sent[i] is None
                choice = self._choice(i, out, stream=True, first=first, text_offset=sent[i] or 0)
                yield _sse(self._envelope([choice], stream=True, prompt_out=out if first and i == 0 else None))
                sent[i] = (sent[i] or 0) + len(choice.get("text", out.text))
        if include_usage:
            yield _sse(self._envelope([], usage(self.prompt_tokens, completion_tokens), stream=True))
        yield _sse("[DONE]")
