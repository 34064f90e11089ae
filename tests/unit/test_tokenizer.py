"""models.tokenizer on its own: chat template errors, streaming detokenization, from_dir templates, merges and
error paths, on the tiny model's synthetic byte-level BPE tokenizer and a SentencePiece-style one (no download)."""

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers import CONVERSATIONS, CUSTOM_TEMPLATE, TEXTS, sentencepiece_fields, stream, tiny_tokenizer_fields
from models.tokenizer import Tokenizer, generate_merges

HYPOTHESIS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tok(tokenizer) -> Tokenizer:
    return tokenizer


@pytest.fixture(scope="module")
def meta() -> dict:
    return tiny_tokenizer_fields()


@pytest.fixture(scope="module")
def sp_tok() -> Tokenizer:
    return Tokenizer.from_gguf(sentencepiece_fields())


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


def test_generate_merges():
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    assert generate_merges(vocab, {"ab": -1.0, "abb": -3.0, "bb": -2.0}) == [("a", "b"), ("b", "b"), ("ab", "b"),
                                                                              ("a", "bb")]


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
