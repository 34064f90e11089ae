"""`xyjax serve` end to end: a live server on 127.0.0.1 (the tiny random-weight model exported as an HF
directory), driven with the official openai client and raw HTTP, stopped with SIGTERM."""

import asyncio
import dataclasses
import json
import os
import re
import signal
import time

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from models.hf_export import export_hf  # noqa: E402

from helpers import TINY, reference_prompt_logprobs, start_server  # noqa: E402

@pytest.fixture(scope="module")
def model_dir(tiny_model, tmp_path_factory):
    """The tiny model with a 2048-token context (long enough that a request can outlast a shutdown grace)."""
    model = dataclasses.replace(tiny_model, config=dataclasses.replace(TINY, max_position_embeddings=2048))
    directory = str(tmp_path_factory.mktemp("tiny-hf"))
    export_hf(model, directory)
    return directory


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = start_server(model_dir, str(tmp_path_factory.mktemp("server") / "log"))
    yield server
    assert server.stop(signal.SIGINT) == 0, open(server.log).read()   # the shutdown test sends SIGTERM


def complete(server, prompt, **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    return server.client().completions.create(model="tiny", prompt=prompt, **kw)


def test_health_models_and_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    models = server.client().models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].model_extra["activation_quant"] == "none"
    assert server.metric("xyjax_compiles") == 3          # buckets 16, 32, 64, all compiled at start-up
    assert server.metric("xyjax_prefix_cache_hit_rate") >= 0


def test_completion_usage_and_streaming_agree(server, tokenizer):
    prompt = "The quick brown fox"
    whole = complete(server, prompt, extra_body={"ignore_eos": True})
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert whole.usage.completion_tokens == 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(complete(server, prompt, extra_body={"ignore_eos": True}, stream=True,
                           stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_round_trip_uses_the_chat_template(server, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    client = server.client()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(tokenizer.apply_chat_template(messages, tokenize=True))
    assert reply.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_end_the_text(server):
    text = complete(server, "Once upon a time", max_tokens=24, extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.index(stop)]
    for stream in (False, True):
        out = complete(server, "Once upon a time", max_tokens=24, stop=[stop], stream=stream)
        choices = [c.choices[0] for c in out] if stream else out.choices
        assert "".join(c.text for c in choices) == expected
        assert choices[-1].finish_reason == "stop"


def test_seeds_are_reproducible_and_n_gives_choices(server):
    def sample(seed, n=1, **kw):
        out = complete(server, "Random words:", max_tokens=10, temperature=1.0, seed=seed, n=n,
                       extra_body={"ignore_eos": True, **kw})
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = sample(7)
    assert sample(7) == first and sample(8) != first
    two = sample(7, n=2)
    assert len(two) == 2 and two[0] == first[0] and two[0] != two[1]
    greedy = complete(server, "Random words:", max_tokens=10, extra_body={"ignore_eos": True}).choices[0].text
    assert sample(7, top_k=1) == [greedy]          # the top_k extension reaches the sampler


def test_logprobs(server):
    out = complete(server, "Hello", max_tokens=5, logprobs=3, extra_body={"ignore_eos": True}).choices[0]
    assert len(out.logprobs.tokens) == len(out.logprobs.token_logprobs) == 5
    assert "".join(out.logprobs.tokens) == out.text
    assert all(len(top) == 3 and max(top.values()) >= lp for top, lp in
               zip(out.logprobs.top_logprobs, out.logprobs.token_logprobs))
    chat = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5, temperature=0, logprobs=True,
        top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    content = chat.logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == chat.message.content
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob for c in content)


def test_32_concurrent_streams_match_their_texts_alone(server):
    prompts = [f"Story {i}: the {['cat', 'dog', 'bird', 'fish'][i % 4]} went" + " far" * (i % 5) for i in range(32)]
    kw = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    alone = [complete(server, p, max_tokens=16, extra_body={"ignore_eos": True}).choices[0].text for p in prompts]

    async def stream(client, prompt):
        text = ""
        async for chunk in await client.completions.create(prompt=prompt, stream=True, **kw):
            text += chunk.choices[0].text
        return text

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(stream(client, p) for p in prompts))

    assert asyncio.run(all_at_once()) == alone


def test_disconnecting_clients_free_their_blocks(server):
    total = server.metric("xyjax_kv_blocks_total")
    aborted = server.metric('xyjax_requests_total{finish_reason="abort"}') if "abort" in httpx.get(
        server.url + "/metrics").text else 0
    body = {"prompt": "Keep going", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=dict(body, stream=True)) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.metric("xyjax_kv_blocks_free") < total
    with pytest.raises(httpx.ReadTimeout):    # a non-streaming client that gives up
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 30
    while server.metric("xyjax_kv_blocks_free") < total and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("xyjax_kv_blocks_free") == total
    assert server.metric('xyjax_requests_total{finish_reason="abort"}') == aborted + 2
    assert server.metric("xyjax_num_requests_running") == 0


BAD_REQUESTS = [  # (path, body: raw bytes or JSON, status, words the message must hold)
    ("/v1/completions", b"{not json", 400, "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 400, "'gpt-4' does not exist"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n must be"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 99}, 400, "max_logprobs"),
    ("/v1/completions", {"prompt": "hi", "prompt_logprobs": 99}, 400, "prompt_logprobs=99"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0, "echo": False}, 400, "0 only with echo"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": True}, 400, "unsupported field 'frobnicate'"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty must be in [-2, 2]"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty must be"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, 400, "logit_bias must be"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "biases in [-100, 100]"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}}, 400, "max_logit_bias is 300"),
    ("/v1/completions", {"prompt": "hi", "allowed_token_ids": [10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", b"[" * 100000 + b"]" * 100000, 400, "nests too deeply"),
    ("/v1/completions", {"prompt": "hi", "stop": [str(i) for i in range(65)]}, 400, "stop holds 65 strings; at most 64"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream=true"),
    ("/v1/completions", {"prompt": "word " * 3000}, 400, "context length"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "context length"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages must not be empty"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400,
     "unsupported field 'tools'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "text content"),
    ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "exceeds"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "[0-9"}, 400, "structured_outputs.regex: at 1(8): invalid"),
    ("/v1/completions", {"prompt": "hi", "guided_json": "{no"}, 400, "guided_json is not valid JSON"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "structured_outputs": {"choice": ["a"]}}, 400,
     "at most one of structured_outputs, guided_regex"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {}}, 400, "exactly one of json, regex"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema"}}, 400, "json_schema is required"),
]


@pytest.mark.parametrize("path,body,status,words", BAD_REQUESTS, ids=[b[3] for b in BAD_REQUESTS])
def test_bad_input_is_refused_and_the_server_keeps_serving(server, path, body, status, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}
    assert complete(server, "Still there?", max_tokens=2).choices[0].finish_reason == "length"


def test_logits_processing_fields_reach_the_sampler(server, tokenizer):
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty, min_p, allowed_token_ids and bad_words, through
    the openai client: a +100 bias makes greedy repeat the token; an allow list confines the output."""
    client = server.client()
    token = tokenizer.encode("fox", add_special_tokens=False)[-1]
    out = client.completions.create(model="tiny", prompt="The quick brown", max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100}, presence_penalty=0.5, frequency_penalty=0.5,
                                    extra_body={"repetition_penalty": 1.1, "min_p": 0.05, "ignore_eos": True})
    assert out.choices[0].text == tokenizer.decode([token] * 4)
    allowed = tokenizer.encode(" a b c", add_special_tokens=False)
    out = client.completions.create(model="tiny", prompt="Say", max_tokens=6, temperature=0.8, seed=3,
                                    extra_body={"allowed_token_ids": allowed, "bad_words": ["zebra"],
                                                "ignore_eos": True})
    assert set(tokenizer.encode(out.choices[0].text, add_special_tokens=False)) <= set(allowed)


def test_tokenize_detokenize_and_version(server, tokenizer):
    """vLLM's /tokenize (a prompt, or chat messages through the template) and /detokenize, and /version."""
    body = httpx.post(server.url + "/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"] == tokenizer.encode("Hello world") and body["count"] == len(body["tokens"])
    assert body["max_model_len"] > 0 and "".join(body["token_strs"]) == tokenizer.decode(body["tokens"])
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert httpx.post(server.url + "/detokenize", json={"tokens": body["tokens"]}).json() == {
        "prompt": tokenizer.decode(body["tokens"])}
    for path, payload, words in (("/tokenize", {"prompt": "a", "messages": messages}, "exactly one"),
                                 ("/detokenize", {"tokens": [10**9]}, "outside the vocabulary"),
                                 ("/detokenize", {"tokens": "abc"}, "tokens")):
        response = httpx.post(server.url + path, json=payload)
        assert response.status_code == 400 and words in response.json()["error"]["message"]
    assert httpx.get(server.url + "/version").json()["version"]


def test_structured_outputs_through_the_client(server):
    """response_format (json_schema, json_object), vLLM's structured_outputs and guided_regex: outputs follow them;
    a bad schema is a 400 naming the problem, and the next request succeeds."""
    client = server.client()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 99}},
              "required": ["ok", "n"], "additionalProperties": False}
    messages = [{"role": "user", "content": "Answer in JSON."}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=32, seed=1, response_format={
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    assert reply.choices[0].finish_reason == "stop"
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"ok", "n"} and isinstance(answer["ok"], bool) and 0 <= answer["n"] <= 99
    out = complete(server, "JSON:", max_tokens=8, extra_body={"response_format": {"type": "json_object"}})
    assert out.choices[0].text.startswith("{")
    out = complete(server, "Code:", temperature=1, n=4, extra_body={"guided_regex": "[A-Z]{2}-[0-9]{2}"})
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{2}", c.text) and c.finish_reason == "stop" for c in out.choices)
    out = complete(server, "Pick:", temperature=1, n=4,
                   extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert all(c.text in ("left", "right") for c in out.choices)
    with pytest.raises(openai.BadRequestError, match="structured_outputs.json: Invalid type: thing"):
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "thing"}}})
    assert complete(server, "Still there?", max_tokens=2).choices[0].finish_reason == "length"


def test_null_fields_take_their_defaults(server):
    body = {"prompt": "hi", "max_tokens": 3, "temperature": None, "n": None, "stop": None, "user": None}
    response = httpx.post(server.url + "/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_unknown_model_through_the_client(server):
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        server.client().completions.create(model="nope", prompt="hi", max_tokens=2)


def test_graceful_shutdown_finishes_then_aborts_in_flight_requests(model_dir, tmp_path):
    server = start_server(model_dir, str(tmp_path / "log"), "--shutdown-timeout", "3")
    client = server.client(timeout=60)
    kw = dict(model="tiny", prompt="Go", temperature=0, stream=True, extra_body={"ignore_eos": True})
    long, short = client.completions.create(max_tokens=2000, **kw), client.completions.create(max_tokens=20, **kw)
    first_long, first_short = next(iter(long)), next(iter(short))
    os.kill(server.proc.pid, signal.SIGTERM)
    short_chunks = [first_short, *short]
    assert short_chunks[-1].choices[0].finish_reason == "length"        # finished within the grace period
    assert [first_long, *long][-1].choices[0].finish_reason == "abort"   # aborted after it, stream closed cleanly
    assert server.proc.wait(60) == 0, open(server.log).read()


def test_load_test_script_reports_no_errors(server):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples", "load_test.py")
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load_test)
    result = asyncio.run(load_test.run(server.url, clients=4, duration=2, max_tokens=8, seed=0))
    assert result["errors"] == 0 and result["requests"] >= 4 and result["output_tokens"] > 0
    assert result["ttft_s"]["p50"] > 0 and result["compiles_after"] == result["compiles_before"]


def test_an_engine_failure_fails_the_requests_in_flight(tiny_model, monkeypatch):
    from xyjax import LLM, SamplingParams
    from xyjax.server import EngineLoop
    from xyjax.server.protocol import APIError

    engine_loop = EngineLoop(LLM(tiny_model, progress=False, max_num_batched_tokens=16, max_num_seqs=4,
                                 kv_cache_memory=1 << 20))

    def broken_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(engine_loop.engine, "step", broken_step)
    engine_loop.start()

    async def run():
        gen = await engine_loop.submit([([1, 2, 3], SamplingParams(max_tokens=4))])
        return [out async for _, out in gen.outputs()]

    outputs = asyncio.run(run())
    assert outputs[-1].finish_reason == "error" and "boom" in outputs[-1].error
    assert not engine_loop.ready and "boom" in engine_loop.error
    with pytest.raises(APIError, match="boom") as refused:       # later requests are refused, not left hanging
        asyncio.run(run())
    assert refused.value.status == 503
    engine_loop.close(0)
    engine_loop.join(timeout=10)
    assert not engine_loop._thread.is_alive()


def test_echo_scores_the_prompt(server, tiny_model, tokenizer):
    prompt = "The river bends twice"
    ids = tokenizer.encode(prompt)
    ref = reference_prompt_logprobs(tiny_model.config, tiny_model.params, ids)
    only = complete(server, prompt, max_tokens=0, echo=True, logprobs=2,
                    extra_body={"prompt_logprobs": 1}).choices[0]       # lm-eval-harness's loglikelihood request
    assert only.text == prompt and only.finish_reason == "length"
    lp = only.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], [ref[i - 1, t] for i, t in enumerate(ids) if i], atol=1e-3)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:]) and lp.text_offset[0] == 0
    vllm = only.model_extra["prompt_logprobs"]                          # vLLM's field: {token id: {logprob, ...}}
    assert vllm[0] is None and [e[str(t)]["logprob"] for t, e in zip(ids[1:], vllm[1:])] == lp.token_logprobs[1:]
    more = complete(server, prompt, max_tokens=4, echo=True, logprobs=0, extra_body={"ignore_eos": True}).choices[0]
    assert more.text.startswith(prompt) and len(more.logprobs.tokens) == len(ids) + 4
    assert more.logprobs.token_logprobs[:len(ids)] == lp.token_logprobs
    streamed = complete(server, prompt, max_tokens=4, echo=True, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == more.text
    chat = server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=2, extra_body={"prompt_logprobs": 0})
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > len(ids)


def test_replicas_go_on_without_a_failed_one_and_count_refused_requests(tiny_model, monkeypatch):
    """Two replicas in this process: the first one's engine fails; the server stays ready and the other serves. A
    refused HTTP request (a bad prompt among good ones) leaves no load behind on the replica that refused it."""
    from xyjax import LLM, SamplingParams
    from xyjax.server import Replicas
    from xyjax.server.protocol import APIError

    options = dict(progress=False, max_num_batched_tokens=16, max_num_seqs=4, kv_cache_memory=1 << 20)
    replicas = Replicas([LLM(tiny_model, **options) for _ in range(2)])
    broken, healthy = replicas.loops

    def broken_step():
        raise RuntimeError("boom")

    monkeypatch.setattr(broken.engine, "step", broken_step)
    replicas.start()
    params = SamplingParams(max_tokens=4)

    async def run(prompts):
        gen = await replicas.submit([(p, params) for p in prompts])
        return [out async for _, out in gen.outputs()]

    async def scenario():   # one event loop throughout: the loops deliver the aborted requests' deltas to it
        assert (await run([[1, 2, 3]]))[-1].finish_reason == "error"     # both idle: the first replica took it
        assert replicas.ready and not broken.ready
        assert (await run([[1, 2, 3]]))[-1].finish_reason == "length"
        with pytest.raises(APIError, match="empty"):
            await run([[1, 2], [], [3, 4]])
        deadline = time.monotonic() + 30
        while healthy.load and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert healthy.load == 0 and healthy.ready
    replicas.close(0)
    replicas.join(timeout=10)
