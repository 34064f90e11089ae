"""models.tokenizer against transformers' tokenizer for the same GGUF: encode, decode, chat templates,
streaming detokenization, save/from_dir round trips, synthetic GGUF tokenizers and error paths."""

import json
import os

import pytest
import ref_venv
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.tokenizer import IncrementalDetokenizer, Tokenizer, generate_merges, gguf_metadata

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _long_text() -> str:
    parts = ["The river bends twice before the old mill; ", "def add(a, b):\n    return a + b\n",
             "Prices rose 3.7% to $1,234.56 in 2024. ", "東京と大阪 🚄 ", "  indented\tline\n"]
    text = ""
    while len(text) < 2000:
        text += "".join(parts)
    return text[:2000]


TEXTS = [
    "Hello, world!", "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n", "3.14159 1234567890 1,000,000 -42 0x1F",
    "   leading and trailing   ", "a\n\nb\r\n\tc\n\n\n", "multiple     spaces", "don't I'm we'll they've",
    "naïve café — “quotes” ‘single’ …", "日本語のテキスト 中文 한국어", "مرحبا بالعالم", "e\u0301 \u00a0nbsp \u200b",
    "emoji 🎉👍🏽 👨‍👩‍👧 family", "<|im_start|>user\nhi<|im_end|>\n", "<|endoftext|><repo_name>x<file_sep>",
    "<|im_start", "", " ", "\n", _long_text(),
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another? 🎨 色"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "1+1?"},
     {"role": "assistant", "content": "2", "tool_calls": None}, {"role": "user", "content": "  and 2+2?\n"}],
]

# Exercises the environment: namespace, loop controls, tojson options, raise_exception, {% generation %},
# trim/lstrip blocks, special-token variables, tools and extra template variables.
CUSTOM_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
  {% if m.role == 'bad' %}{{ raise_exception('bad role: ' + m.role) }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if loop.index > 3 %}{% break %}{% endif %}
  [{{ m.role }}] {{ m.content | tojson }} {{ m | tojson(sort_keys=True) }} {{ m.tool_calls is defined }}
{% endfor %}
{% generation %}{{ bos_token }}|{{ eos_token }}|{{ ns.n }}{% endgeneration %}
{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}
{{ custom_var }} {{ strftime_now('%Y') }}{% if add_generation_prompt %}<go>{% endif %}
"""


# ---- fixtures ---------------------------------------------------------------------------------------
# The default model's GGUF, metadata and tokenizer come from conftest (fetched once, cached).
@pytest.fixture(scope="module")
def model_file(gguf_path) -> str:
    return gguf_path


@pytest.fixture(scope="module")
def meta(gguf_meta) -> dict:
    return gguf_meta


@pytest.fixture(scope="module")
def tok(tokenizer) -> Tokenizer:
    return tokenizer


@pytest.fixture(scope="module")
def hf_tok(model_file):
    transformers = ref_venv.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(model_file),
                                                      gguf_file=os.path.basename(model_file))


def sentencepiece_fields(arch: str = "llama") -> dict:
    """A small SentencePiece-style (``tokenizer.ggml.model == "llama"``) vocabulary with scores, no merges."""
    pieces = ["▁", "▁t", "he", "▁the", "▁a", "in", "er", "▁w", "or", "ld", "▁wor", "▁world", "ll", "o", "▁he",
              "▁hello", "hello", "▁is", "is", "at", *"abcdefghijklmnopqrstuvwxyz"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * 259
    for i, piece in enumerate(dict.fromkeys(pieces)):
        tokens.append(piece), types.append(1), scores.append(-float(i))
    tokens += ["<think>", "<|im_end|>"]
    types += [4, 3]
    scores += [0.0, 0.0]
    return {"general.architecture": arch, "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.chat_template": "{% for m in messages %}{{ bos_token + m['content'] + eos_token }}{% endfor %}"}


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return Tokenizer.from_gguf(sentencepiece_fields())


def write_gguf(path: str, fields: dict) -> None:
    """A metadata-only GGUF (a tiny llama config plus ``fields``) that transformers can read a tokenizer from."""
    import gguf

    w = gguf.GGUFWriter(path, fields["general.architecture"])
    w.add_block_count(1), w.add_context_length(64), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_rope_freq_base(10000.0)
    for key, value in fields.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, value)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def stream(tokenizer, ids, prompt_ids=None, skip_special_tokens=False) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.add(i) for i in ids] + [detok.flush()]


# ---- GGUF metadata ------------------------------------------------------------------------------------
def test_gguf_metadata_is_plain_python(meta):
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert isinstance(meta["tokenizer.ggml.tokens"], list) and isinstance(meta["tokenizer.ggml.tokens"][0], str)
    assert type(meta["tokenizer.ggml.bos_token_id"]) is int
    assert isinstance(meta["tokenizer.chat_template"], str)


def test_properties_match_transformers(tok, hf_tok, meta):
    assert tok.vocab_size == len(hf_tok) == len(meta["tokenizer.ggml.tokens"])
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert tok.eos_token_id == hf_tok.eos_token_id == meta["tokenizer.ggml.eos_token_id"]
    assert tok.special_tokens == hf_tok.special_tokens_map
    vocab = hf_tok.get_vocab()
    assert tok.stop_token_ids == {vocab["<|im_end|>"], vocab["<|endoftext|>"]}
    assert json.loads(tok.backend.to_str()) == json.loads(hf_tok.backend_tokenizer.to_str())


# ---- encode / decode --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text).input_ids == hf_tok.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf_tok.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    if "<|" not in text:
        assert tok.decode(ids) == text


def test_decode_random_ids_matches_transformers(tok, hf_tok):
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 40, 300):
        ids = rng.integers(0, tok.vocab_size, n)
        ids[: n // 5] = rng.integers(0, 17, n // 5)  # some special tokens
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids.tolist(), skip_special_tokens=skip)


# ---- chat templates -------------------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    kw = dict(add_generation_prompt=add_generation_prompt)
    text = tok.apply_chat_template(messages, **kw)
    assert text == hf_tok.apply_chat_template(messages, tokenize=False, **kw)
    ids = tok.apply_chat_template(messages, tokenize=True, **kw)
    assert ids == hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
    assert ids[0] == tok.token_to_id("<|im_start|>") and tok.decode(ids) == text


def test_custom_template_environment_matches_transformers(tok, hf_tok):
    messages = CONVERSATIONS[3] + [{"role": "user", "content": 'quote " and </script> & ü'}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"x": {"type": "int"}}}}]
    for add_generation_prompt in (True, False):
        kw = dict(chat_template=CUSTOM_TEMPLATE, tools=tools, custom_var="v",
                  add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(messages, **kw) == hf_tok.apply_chat_template(messages, tokenize=False, **kw)


def test_continue_final_message_matches_transformers(tok, hf_tok):
    messages = CONVERSATIONS[0] + [{"role": "assistant", "content": "Sure, here"}]
    ours = tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert ours == hf_tok.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    assert ours.endswith("Sure, here")


def test_chat_template_errors(tok):
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}], chat_template=CUSTOM_TEMPLATE)
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}],
                                chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(jinja2.exceptions.SecurityError):  # the sandbox
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ messages.append(1) }}")
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="mutually exclusive"):
        tok.apply_chat_template(CONVERSATIONS[0], continue_final_message=True)
    no_template = Tokenizer(tok.backend, tok.special_tokens, None)
    with pytest.raises(ValueError, match="no chat template"):
        no_template.apply_chat_template(CONVERSATIONS[0])


# ---- incremental detokenization ------------------------------------------------------------------------------
def test_detokenizer_holds_back_split_characters(tok):
    ids = tok.encode("🎉")
    assert len(ids) > 1  # the emoji's bytes span several tokens
    deltas = stream(tok, ids)
    assert deltas[:-2] == [""] * (len(ids) - 1) and "".join(deltas) == "🎉"
    assert all("\ufffd" not in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_streams_valid_text(tok, sp_tok, text):
    for tokenizer in (tok, sp_tok):
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)
        assert not any("\ufffd" in d for d in deltas)


@HYPOTHESIS
@given(text=st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd"), max_size=40))
@example(text="🎉 漢字 かな ünï 👨‍👩‍👧")
@example(text=" 😀😀 x")
def test_detokenizer_valid_text_property(tok, sp_tok, text):
    for tokenizer in (tok, sp_tok):
        ids = tokenizer.encode(text, add_special_tokens=False)
        deltas = stream(tokenizer, ids)
        assert "".join(deltas) == tokenizer.decode(ids)
        if "\ufffd" not in tokenizer.decode(ids):  # (byte-level vocabularies may lack a byte: text is lost)
            assert not any("\ufffd" in d for d in deltas)
    prompt = tok.encode("Question: ")  # byte-level: prompt context does not change the streamed text
    assert "".join(stream(tok, tok.encode(text), prompt_ids=prompt)) == tok.decode(tok.encode(text))


@HYPOTHESIS
@given(data=st.data())
@example(data=None)
def test_detokenizer_random_ids_property(tok, sp_tok, data):
    for tokenizer in (tok, sp_tok):
        multibyte = tokenizer.encode("🎉👍🏽漢字ü", add_special_tokens=False)
        if data is None:  # the pieces of multi-byte characters, out of order
            ids = multibyte[::-1] + multibyte[1:] + [0, 1, 2]
        else:
            id_strategy = st.one_of(st.integers(0, tokenizer.vocab_size - 1), st.sampled_from(multibyte))
            ids = data.draw(st.lists(id_strategy, max_size=24))
        for skip in (False, True):
            assert "".join(stream(tokenizer, ids, skip_special_tokens=skip)) == tokenizer.decode(ids, skip)


def test_detokenizer_sentencepiece_prompt_context_keeps_space(sp_tok):
    prompt, ids = sp_tok.encode("hello"), sp_tok.encode(" world", add_special_tokens=False)
    assert "".join(stream(sp_tok, ids)) == sp_tok.decode(ids) == "world"
    assert "".join(stream(sp_tok, ids, prompt_ids=prompt)) == " world"
    import numpy as np

    assert "".join(stream(sp_tok, np.array(ids), prompt_ids=np.array(prompt))) == " world"


# ---- save / from_dir -------------------------------------------------------------------------------------------
def test_save_from_dir_round_trip(tok, hf_tok, tmp_path):
    transformers = ref_venv.importorskip("transformers")
    tok.save(str(tmp_path))
    again = Tokenizer.from_dir(str(tmp_path))
    hf_again = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text) == hf_again.encode(text)
    ids = tok.encode(TEXTS[-1] + TEXTS[13])
    assert again.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        assert (again.apply_chat_template(messages) == tok.apply_chat_template(messages)
                == hf_again.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert (again.bos_token_id, again.eos_token_id, again.vocab_size, again.stop_token_ids, again.special_tokens) == (
        tok.bos_token_id, tok.eos_token_id, tok.vocab_size, tok.stop_token_ids, tok.special_tokens)


def test_from_dir_template_files_and_generation_config(tok, tmp_path):
    tok.save(str(tmp_path))
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    del config["chat_template"]
    config_file.write_text(json.dumps(config))
    assert Tokenizer.from_dir(str(tmp_path)).chat_template is None
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages[0].content }}"}))
    assert Tokenizer.from_dir(str(tmp_path)).apply_chat_template(CONVERSATIONS[0]) == "json:hi"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    assert Tokenizer.from_dir(str(tmp_path)).apply_chat_template(CONVERSATIONS[0]) == "jinja:hi"
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert Tokenizer.from_dir(str(tmp_path)).stop_token_ids == tok.stop_token_ids | {7}


def test_from_dir_named_templates(tok, tmp_path):
    tok.save(str(tmp_path))
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = [{"name": "default", "template": "d"}, {"name": "tool_use", "template": "t"}]
    config_file.write_text(json.dumps(config))
    named = Tokenizer.from_dir(str(tmp_path))
    assert named.apply_chat_template(CONVERSATIONS[0]) == "d"
    assert named.apply_chat_template(CONVERSATIONS[0], tools=[{"name": "f"}]) == "t"
    assert named.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use") == "t"
    named.save(str(tmp_path / "again"))
    assert Tokenizer.from_dir(str(tmp_path / "again")).chat_template == {"default": "d", "tool_use": "t"}


# ---- other GGUF tokenizers, against transformers reading a synthetic GGUF --------------------------------------
def _gpt2_variant_fields(meta: dict) -> dict:
    fields = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    types = list(fields["tokenizer.ggml.token_type"])
    types[5] = 4  # <file_sep> becomes a user-defined (non-special) added token
    tokens = list(fields["tokenizer.ggml.tokens"])
    tokens[6] = "<fi le>"  # a control token not spelled in the byte alphabet: not added as special
    return {**fields, "general.architecture": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_bos_token": True}


@pytest.mark.parametrize("variant", ["sentencepiece", "phi3", "gpt2-qwen2-bos"])
def test_other_gguf_tokenizers_match_transformers(variant, meta, tmp_path):
    transformers = ref_venv.importorskip("transformers")
    if variant == "gpt2-qwen2-bos":
        fields = _gpt2_variant_fields(meta)
    else:
        fields = sentencepiece_fields("phi3" if variant == "phi3" else "llama")
    write_gguf(str(tmp_path / "t.gguf"), fields)
    import gguf

    ours = Tokenizer.from_gguf(gguf_metadata(gguf.GGUFReader(str(tmp_path / "t.gguf"))))
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    texts = TEXTS[:-1] + ["hello world", " the world is at", "<s>hello</s><think>x<|im_end|>", "<file_sep><fi le>"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text), text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert ours.special_tokens == hf.special_tokens_map
    assert (ours.bos_token_id, ours.eos_token_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    messages = CONVERSATIONS[2]
    assert ours.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)


def test_generate_merges():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    assert generate_merges(vocab, {"ab": -1.0, "abb": -3.0, "bb": -2.0}) == [("a", "b"), ("b", "b"), ("ab", "b"),
                                                                              ("a", "bb")]


# ---- error paths ---------------------------------------------------------------------------------------------
def test_error_paths(meta, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.from_gguf({"general.architecture": "llama"})
    for model in ("t5", "bert", None):
        with pytest.raises(ValueError, match=f"unsupported GGUF tokenizer model {model!r}"):
            Tokenizer.from_gguf({**meta, "tokenizer.ggml.model": model})
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'llama'.*gemma"):
        Tokenizer.from_gguf(sentencepiece_fields("gemma2"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer.from_gguf({**meta, "tokenizer.ggml.bos_token_id": 10**6})
    fields = sentencepiece_fields()
    del fields["tokenizer.ggml.scores"]
    with pytest.raises(ValueError, match="neither tokenizer.ggml.merges nor tokenizer.ggml.scores"):
        Tokenizer.from_gguf(fields)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(str(tmp_path))
    with pytest.raises(TypeError, match="str"):
        Tokenizer.from_gguf(sentencepiece_fields()).encode(b"bytes")
