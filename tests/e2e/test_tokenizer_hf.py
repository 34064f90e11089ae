"""models.tokenizer against transformers' tokenizer for the same GGUF: encode, decode, chat templates, save/from_dir
round trips, synthetic GGUF tokenizers (the tokenizer on its own: unit/test_tokenizer.py)."""

import json
import os

import pytest
import ref_venv

from helpers import CONVERSATIONS, CUSTOM_TEMPLATE, TEXTS, sentencepiece_fields
from models.tokenizer import Tokenizer, gguf_metadata


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


# ---- incremental detokenization ------------------------------------------------------------------------------
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


# ---- error paths ---------------------------------------------------------------------------------------------
