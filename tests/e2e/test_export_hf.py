"""``xyjax export-hf``: a model written as an HF directory reads back identically (xyjax's loader; the split block
layout of 4-bit weights as the plain weights it holds) and transformers computes the same logits from it."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
import ref_venv

from helpers import TINY
from models.hf_export import export_hf
from models.llama import init_params
from models.loader import LoadedModel, load
from models.weights import DENSE
from xyjax.ops.gemm.formats import quantize_blocks
from helpers import reference_logits


@pytest.mark.parametrize("variant", ["tied", "untied-bias", "split-blocks"])
def test_round_trip_and_transformers_logits(tmp_path, tiny_model, variant):
    model, expected = tiny_model, tiny_model.params
    if variant == "untied-bias":   # a separate LM head and QKV biases (the Qwen2 layout)
        cfg = dataclasses.replace(TINY, tie_word_embeddings=False, attention_bias=True, architecture="qwen2")
        model = LoadedModel(name="tiny-qwen", config=cfg, params=init_params(cfg, jax.random.key(1), scale=0.2),
                            tokenizer=tiny_model.tokenizer, dtype=tiny_model.dtype)
        expected = model.params
    if variant == "split-blocks":   # dense matrices block-quantized (SplitBlocks): exported as their dense view
        params = init_params(TINY, jax.random.key(2), scale=0.2)
        split = {k: quantize_blocks(np.asarray(v)) if k in DENSE else v for k, v in params["layers"].items()}
        model = LoadedModel(name="tiny-q4", config=TINY, params=dict(params, layers=split),
                            tokenizer=tiny_model.tokenizer, dtype=tiny_model.dtype)
        layers = {k: v.dense() if k in DENSE else v for k, v in split.items()}
        expected = dict(params, layers=layers)
    directory = str(tmp_path / "hf")
    export_hf(model, directory)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(directory))
    back = load(directory, progress=False)
    assert back.config == model.config
    flat, _ = jax.tree.flatten_with_path(expected)
    again = dict(jax.tree.flatten_with_path(back.params)[0])
    for path, value in flat:
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(value), err_msg=jax.tree_util.keystr(path))
    assert json.load(open(os.path.join(directory, "config.json")))["eos_token_id"] == model.tokenizer.eos_token_id

    torch = ref_venv.importorskip("torch")
    transformers = ref_venv.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    ids = [1, 9000, 421, 77, 30000, 5, 12]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0, -1].numpy()
    ours = reference_logits(model.config, model.params, ids)
    np.testing.assert_allclose(ours, logits, atol=1e-4 * np.abs(logits).max(), rtol=0)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    assert tok("Hello world")["input_ids"] == model.tokenizer.encode("Hello world")
