"""The OpenAI wire format: request models (validated with pydantic) and the response objects (plain dicts).

Requests are strict: an unknown field is refused ("unsupported field"), types are not coerced, and the
fields the engine cannot honour (best_of, suffix) are accepted only at their no-op values. Sampling
values are range-checked once, by ``SamplingParams``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xyjax.engine.outputs import RequestOutput
from xyjax.engine.sampling_params import SamplingParams


class APIError(Exception):
    """An error the client caused (or a refusal): becomes ``{"error": {...}}`` with this HTTP status."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# the parts of a pydantic error location that name a union member's type rather than a field
_TYPE_TAG = re.compile(r"^(str|int|float|bool|dict|list|none)(\[.*\])?$|^function-")


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic error, naming its field."""
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"] if not _TYPE_TAG.match(str(p))) or None
    if err["type"] == "extra_forbidden":
        return APIError(f"unsupported field {field!r}", param=field)
    return APIError(f"{field}: {err['msg']}" if field else err["msg"], param=field)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """A field sent as null takes its default (clients send nulls for what they leave unset)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchema(_Strict):
    name: str
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's response_format: free text, any JSON object, or JSON following ``json_schema.schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _check(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise APIError("response_format.json_schema is required with type json_schema, and only then",
                           param="response_format")
        return self


class StructuredOutputsRequest(_Strict):
    """vLLM's structured_outputs (the fields xyjax implements): exactly one of json (a schema, as an object or
    JSON text), regex, choice, grammar (Lark)."""

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


def _schema(value: dict | str, field: str) -> dict:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(value, dict):
        return value
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as e:
        raise APIError(f"{field} is not valid JSON: {e}", param=field) from None


class SamplingRequest(_Strict):
    """The fields completions and chat share; top_k, min_p, min_tokens, ignore_eos, stop_token_ids,
    skip_special_tokens, repetition_penalty, allowed_token_ids, bad_words and prompt_logprobs are vLLM's
    extensions. logit_bias maps
    token ids (as JSON object keys: strings) to biases; at most the engine's max_logit_bias entries. Structured
    outputs: OpenAI's response_format, vLLM's structured_outputs or its older guided_json, guided_regex,
    guided_choice and guided_grammar (at most one of these)."""

    model: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = None
    # OpenAI fields the engine does not implement: accepted at their no-op values (NO_OPS) only.
    NO_OPS: ClassVar[dict] = {}

    MAX_N: ClassVar[int] = 64
    MAX_STOP: ClassVar[int] = 64   # stop strings per request (each is searched in every new piece of text)

    # Model validators raise APIError (not ValueError, which pydantic would wrap without the field's name).
    @model_validator(mode="after")
    def _check(self):
        for field, allowed in self.NO_OPS.items():
            if getattr(self, field) not in allowed:
                raise APIError(f"{field} is not supported (only {' or '.join(map(repr, allowed))})", param=field)
        if isinstance(self.stop, list) and len(self.stop) > self.MAX_STOP:
            raise APIError(f"stop holds {len(self.stop)} strings; at most {self.MAX_STOP}", param="stop")
        if not 1 <= self.n <= self.MAX_N:
            raise APIError(f"n must be an integer in [1, {self.MAX_N}], got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed with stream=true", param="stream_options")
        return self

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """The engine's SamplingParams of choice ``index`` (a seeded request's choices get seed + index)."""
        seed = None if self.seed is None else (self.seed + index) % 2**32
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                                  top_k=self.top_k, seed=seed, stop=self.stop or [],
                                  stop_token_ids=self.stop_token_ids or [], min_tokens=self.min_tokens,
                                  ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                                  logprobs=logprobs, presence_penalty=self.presence_penalty,
                                  frequency_penalty=self.frequency_penalty,
                                  repetition_penalty=self.repetition_penalty, min_p=self.min_p,
                                  logit_bias=self.logit_bias, allowed_token_ids=self.allowed_token_ids,
                                  bad_words=self.bad_words, structured_outputs=self.structured(),
                                  prompt_logprobs=self.prompt_scoring(max_tokens))
        except ValueError as e:   # "SamplingParams.top_p must be ...": the field is the wire name
            field = str(e).split(" ", 1)[0].removeprefix("SamplingParams.")
            raise APIError(str(e).removeprefix("SamplingParams."), param=field) from None

    def prompt_scoring(self, max_tokens: int) -> int | None:
        """The engine's SamplingParams.prompt_logprobs."""
        return self.prompt_logprobs

    def structured(self) -> dict | None:
        """The StructuredOutputs fields the request asks for (None: free text)."""
        asked = {}
        if self.response_format is not None and self.response_format.type != "text":
            schema = self.response_format.json_schema
            asked["response_format"] = {"json": "object" if schema is None else schema.schema_}
        if self.structured_outputs is not None:
            fields = self.structured_outputs.model_dump(by_alias=True, exclude_none=True)
            if "json" in fields:
                fields["json"] = _schema(fields["json"], "structured_outputs.json")
            asked["structured_outputs"] = fields
        guided = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        for kind, value in guided.items():
            if value is not None:
                asked["guided_" + kind] = {kind: _schema(value, "guided_json") if kind == "json" else value}
        if len(asked) > 1:
            raise APIError(f"at most one of {', '.join(asked)} may be given", param=list(asked)[1])
        return next(iter(asked.values()), None)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingRequest):
    """POST /v1/completions: a prompt is a string or token ids, or a list of either (one per prompt). ``echo``:
    each choice's text (and logprobs) starts with its prompt's; with max_tokens 0, it is only that."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    NO_OPS: ClassVar[dict] = dict(SamplingRequest.NO_OPS, best_of=(None, 1), suffix=(None, ""))

    @model_validator(mode="after")
    def _check_echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens must be >= 1 (0 only with echo=true: the prompt and its logprobs alone)",
                           param="max_tokens")
        return self

    def prompt_scoring(self, max_tokens: int) -> int | None:
        """The engine's prompt_logprobs: the most asked of prompt_logprobs and (with echo) logprobs; 0 to finish
        after the prompt (max_tokens 0) when neither is given."""
        asked = [n for n in (self.prompt_logprobs, self.logprobs if self.echo else None) if n is not None]
        return max(asked) if asked else (0 if max_tokens == 0 else None)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if not p:
            raise APIError("prompt must not be empty", param="prompt")
        return list(p)


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    name: str | None = None

    def text(self) -> str | None:
        """The content as text; list content may hold only text parts."""
        if not isinstance(self.content, list):
            return self.content
        if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in self.content):
            raise APIError("only text content parts ({'type': 'text', 'text': ...}) are supported",
                           param="messages")
        return "".join(part["text"] for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if not self.messages:
            raise APIError("messages must not be empty", param="messages")
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        return self

    def conversation(self) -> list[dict]:
        return [{k: v for k, v in dict(role=m.role, content=m.text(), name=m.name).items() if v is not None}
                for m in self.messages]

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses --------------------------------------------------------------------------------------

class TokenizeRequest(_Strict):
    """POST /tokenize (vLLM's shape): a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        return self


class DetokenizeRequest(_Strict):
    """POST /detokenize (vLLM's shape)."""

    model: str | None = None
    tokens: list[int]


def response_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def envelope(rid: str, obj: str, model: str, choices: list[dict], usage: dict | None = None,
             created: int | None = None) -> dict:
    """The frame every response and stream chunk shares."""
    out = dict(id=rid, object=obj, created=created or int(time.time()), model=model, choices=choices)
    if usage is not None:
        out["usage"] = usage
    return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return dict(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens)


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    """The n most likely of an engine logprob entry {sampled id: lp, top ids: lp...}."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def completion_logprobs(token_ids: list[int], entries: list[dict[int, float] | None], n: int, decode,
                        offset: int) -> dict:
    """OpenAI's legacy completions logprobs of ``token_ids`` with their engine entries (None: no logprob, the
    first prompt token); ``offset``: characters of text before them."""
    tokens = [decode(t) for t in token_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return dict(tokens=tokens, token_logprobs=[None if e is None else e[t] for t, e in zip(token_ids, entries)],
                top_logprobs=[None if e is None else {decode(i): lp for i, lp in _top(e, n)} for e in entries],
                text_offset=offsets)


def prompt_logprobs(entries: list[dict[int, float] | None], decode) -> list[dict | None]:
    """vLLM's prompt_logprobs field: per prompt token None (the first) or {token id: {logprob, decoded_token}}."""
    return [None if e is None else {str(t): dict(logprob=lp, decoded_token=decode(t)) for t, lp in e.items()}
            for e in entries]


def chat_logprobs(out: RequestOutput, n: int, decode) -> dict:
    """Chat logprobs of ``out``'s tokens: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def item(token_id: int, lp: float) -> dict:
        text = decode(token_id)
        return dict(token=text, logprob=lp, bytes=list(text.encode()))

    return {"content": [dict(item(t, e[t]), top_logprobs=[item(i, lp) for i, lp in _top(e, n)])
                        for t, e in zip(out.token_ids, out.logprobs)]}
