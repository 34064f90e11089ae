"""Weight loaders: the Q/K permutation, HF directories (Llama and Qwen2 with bias) and bad files."""

import json

import jax.numpy as jnp
import jax
import numpy as np
import pytest
import ref_venv

from models.gguf_loader import dequantize, load_gguf, read_gguf
from models.weights import DENSE
from xyjax.ops.gemm import prepare_weights
from xyjax.ops.gemm.formats import GGUFBlocks, SplitBlocks
from models.hf_loader import load_hf
from models.loader import load


def test_truncated_real_gguf_names_the_problem(gguf_path, tmp_path):
    data = open(gguf_path, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="GGUF"):
        load_gguf(str(cut), progress=False)


def old_split_q4_1(tensor) -> np.ndarray:
    """What the loader held before GGUFBlocks (its ``split_q4_1``): a Q4_1 tensor [out, in] as [d * q | m]
    float32, computed in numpy from the file's bytes (20 per block: d, m float16, 16 bytes of nibbles)."""
    raw = np.asarray(tensor.data, np.uint8)
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    mins = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    q = np.concatenate([blocks[..., 4:] & 0x0F, blocks[..., 4:] >> 4], axis=-1).astype(np.float32)
    return np.concatenate([(d[..., None] * q).reshape(raw.shape[0], -1), mins], axis=-1)


def test_real_q4_1_model_loads_its_blocks(gguf_path):
    """The default model loads its dense matrices (Q4_1) and its embedding, the tied LM head (Q8_0), as GGUFBlocks
    (the file's bytes), whose dense view is gguf's own dequantization; the norms are plain. The ffi backend's auto
    layout keeps the blocks; the split layout holds what the loader held before GGUFBlocks (SplitBlocks
    [d * q | m]), bit for bit. A bfloat16 load holds every weight plain, the float32 weights rounded."""
    from models.gguf_loader import unpermute_qk

    model = load(gguf_path, progress=False)
    tensors = {t.name: t for t in read_gguf(gguf_path).tensors}
    layers = model.params["layers"]
    for name in DENSE:
        assert isinstance(layers[name], GGUFBlocks) and layers[name].qtype == "Q4_1", name
        assert layers[name].data.dtype == jnp.uint8, name
    embed = model.params["embed"]
    assert isinstance(embed, GGUFBlocks) and embed.qtype == "Q8_0" and "lm_head" not in model.params
    np.testing.assert_array_equal(np.asarray(embed.dense()), dequantize(tensors["token_embd.weight"], np.float32))
    gate_up = np.asarray(layers["w_gate_up"].dense())[0]
    up = dequantize(tensors["blk.0.ffn_up.weight"], np.float32)
    np.testing.assert_array_equal(gate_up[gate_up.shape[0] // 2:], up)
    assert prepare_weights(model.params, "ffi")["layers"]["wqkv"] is layers["wqkv"]
    cfg = model.config
    old = [unpermute_qk(old_split_q4_1(tensors["blk.0.attn_q.weight"]), cfg.num_heads),
           unpermute_qk(old_split_q4_1(tensors["blk.0.attn_k.weight"]), cfg.num_kv_heads),
           old_split_q4_1(tensors["blk.0.attn_v.weight"])]
    split = prepare_weights(model.params, "ffi", "split")["layers"]["wqkv"]
    assert isinstance(split, SplitBlocks)
    np.testing.assert_array_equal(np.asarray(split.data[0]), np.concatenate(old))
    half = load(gguf_path, dtype="bfloat16", progress=False)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(half.params))
    np.testing.assert_array_equal(np.asarray(half.params["layers"]["w_gate_up"][0], np.float32),
                                  np.asarray(jnp.asarray(gate_up, jnp.bfloat16), np.float32))


def test_real_model_greedy_output_is_the_float32_models(gguf_path):
    """The engine on the default model with its weights read in place as the file's blocks (the default layout)
    generates the same greedy tokens as on the whole model dequantized to float32 ("plain")."""
    from xyjax import LLM, SamplingParams

    model = load(gguf_path, progress=False)
    sampling = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colors:"]
    tokens = {}
    for layout in ("auto", "plain"):
        llm = LLM(model, weight_layout=layout, progress=False)
        tokens[layout] = [o.token_ids for o in llm.generate(prompts, sampling)]
    assert tokens["auto"] == tokens["plain"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_directory_matches_transformers(arch, tmp_path):
    torch = ref_venv.importorskip("torch")
    transformers = ref_venv.importorskip("transformers")
    from helpers import reference_logits

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=5000.0)
    torch.manual_seed(0)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(tie_word_embeddings=False, **common))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(tie_word_embeddings=True, **common))
    model.eval()
    model.save_pretrained(tmp_path)
    cfg, params = load_hf(str(tmp_path), progress=False)
    assert cfg.attention_bias == (arch == "qwen2") and json.load(open(tmp_path / "config.json"))
    ids = list(range(5, 40))
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    got = reference_logits(cfg, params, ids)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_resolve_names_gguf_paths_and_hf_dirs(gguf_path, tmp_path):
    from models.loader import resolve

    assert resolve(None) == gguf_path and resolve("SmolLM2-135M-Instruct") == gguf_path
    assert resolve(gguf_path) == gguf_path
    (tmp_path / "config.json").write_text("{}")
    assert resolve(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="known model names.*GGUF file.*HF directory"):
        resolve(str(tmp_path / "elsewhere"))


def test_llm_serves_an_hf_directory(tmp_path, tokenizer):
    torch = ref_venv.importorskip("torch")
    transformers = ref_venv.importorskip("transformers")
    from helpers import reference_greedy

    from xyjax import LLM, SamplingParams

    torch.manual_seed(1)
    config = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save(str(tmp_path))
    llm = LLM(str(tmp_path), progress=False)
    out = llm.generate(["Hello there"], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(llm.model, tokenizer.encode("Hello there"), 5)
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
