"""The GGUF loader on synthetic files: the Q/K permutation, bad files, dense matrices kept as the file's blocks
(GGUFBlocks of every supported type, fused and stacked, or dequantized where the fused parts' types differ)."""

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import gguf_block_bytes
from models.gguf_loader import dequantize, gguf_blocks, load_gguf, permute_qk, read_gguf, unpermute_qk
from xyjax.ops.gemm.formats import GGUF_QTYPES, GGUFBlocks, SplitBlocks, convert, quantize_blocks


@pytest.mark.parametrize("heads,rows,cols", [(9, 576, 8), (3, 192, 5), (1, 4, 1)])
def test_qk_permutation_round_trip(heads, rows, cols):
    w = np.random.default_rng(0).standard_normal((rows, cols))
    assert np.array_equal(unpermute_qk(permute_qk(w, heads), heads), w)
    assert not np.array_equal(permute_qk(w, heads), w) or rows // heads == 2


def test_unpermute_turns_interleaved_rope_into_half_split():
    # llama.cpp stores each head's rotary pairs interleaved (x0, y0, x1, y1); HF keeps halves (x0, x1, y0, y1).
    interleaved = np.array([0, 10, 1, 11, 2, 12, 3, 13], float)[:, None]
    assert unpermute_qk(interleaved, 1)[:, 0].tolist() == [0, 1, 2, 3, 10, 11, 12, 13]


def test_corrupt_gguf_is_named(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ValueError, match="corrupt or unsupported GGUF"):
        read_gguf(str(bad))
    with pytest.raises(FileNotFoundError):
        read_gguf(str(tmp_path / "nothing.gguf"))


def test_unsupported_tensor_type_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_K]  # gguf cannot dequantize it
    w.add_tensor("token_embd.weight", np.zeros((4, block_bytes), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_K)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    from models.gguf_loader import dequantize

    tensor = read_gguf(str(path)).tensors[0]
    with pytest.raises(ValueError, match="token_embd.weight.*Q8_K: the gguf package cannot dequantize it.*Q8_0, "
                                         "Q4_0, Q4_1, Q4_K, Q6_K"):
        dequantize(tensor, np.float32)


def write_gguf(path, tensors: dict, metadata: dict | None = None):
    """A GGUF file of ``tensors`` (name -> float32 array, or (qtype name, [N, K] float32 values) written as that
    type's blocks: ``helpers.gguf_block_bytes``); returns name -> the bytes or array written."""
    import gguf

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (metadata or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32)(key, value)
    written = {}
    for name, t in tensors.items():
        if isinstance(t, tuple):
            qtype, values = t
            written[name] = gguf_block_bytes(qtype, values, rng)
            w.add_tensor(name, written[name], raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            written[name] = t
            w.add_tensor(name, t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    return written


@pytest.mark.parametrize("qtype", tuple(GGUF_QTYPES))
def test_block_tensor_is_the_files_bytes(tmp_path, qtype):
    """A tensor of each supported block type, written by gguf (its own quantizer where it has one): gguf_blocks
    holds the file's bytes, whose dense view is gguf's dequantization bit for bit."""
    values = (0.1 * np.random.default_rng(1).standard_normal((8, 512))).astype(np.float32)
    written = write_gguf(tmp_path / "t.gguf", {"blk.0.ffn_up.weight": (qtype, values)})
    tensor = read_gguf(str(tmp_path / "t.gguf")).tensors[0]
    blocks = gguf_blocks(tensor)
    assert isinstance(blocks, GGUFBlocks) and (blocks.qtype, blocks.shape) == (qtype, (8, 512))
    np.testing.assert_array_equal(blocks.data, written["blk.0.ffn_up.weight"])
    np.testing.assert_array_equal(np.asarray(blocks.dense()), dequantize(tensor, np.float32))


def test_model_keeps_its_dense_matrices_as_blocks(tmp_path):
    """A 2-layer Llama GGUF with q/k/v Q8_0, o Q4_K, gate/up Q4_1 (layer 1: up Q4_0), down Q6_K, the rest float32:
    wqkv, wo, w_down load as GGUFBlocks of their type (Q/K rows un-permuted, fused, stacked), w_gate_up, whose
    parts differ in type, dense; every matrix's dense view is gguf's dequantization of its tensors."""
    D, F, H, HKV, L, V = 256, 256, 4, 2, 2, 8
    rng = np.random.default_rng(2)
    values = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)  # noqa: E731
    tensors = {"token_embd.weight": values(V, D), "output_norm.weight": values(D)}
    types = dict(attn_q="Q8_0", attn_k="Q8_0", attn_v="Q8_0", attn_output="Q4_K", ffn_gate="Q4_1", ffn_up="Q4_1",
                 ffn_down="Q6_K")
    shapes = dict(attn_q=(D, D), attn_k=(D // 2, D), attn_v=(D // 2, D), attn_output=(D, D), ffn_gate=(F, D),
                  ffn_up=(F, D), ffn_down=(D, F))
    for i in range(L):
        tensors |= {f"blk.{i}.attn_norm.weight": values(D), f"blk.{i}.ffn_norm.weight": values(D)}
        for kind, qtype in types.items():
            qtype = "Q4_0" if (i, kind) == (1, "ffn_up") else qtype
            tensors[f"blk.{i}.{kind}.weight"] = (qtype, values(*shapes[kind]))
    meta = {"llama.embedding_length": D, "llama.feed_forward_length": F, "llama.block_count": L,
            "llama.attention.head_count": H, "llama.attention.head_count_kv": HKV, "llama.vocab_size": V,
            "llama.attention.layer_norm_rms_epsilon": 1e-5}
    write_gguf(tmp_path / "m.gguf", tensors, meta)
    cfg, params, _ = load_gguf(str(tmp_path / "m.gguf"), progress=False)
    file = {t.name: t for t in read_gguf(str(tmp_path / "m.gguf")).tensors}

    def deq(name, heads=None):
        w = dequantize(file[name], np.float32)
        return w if heads is None else unpermute_qk(w, heads)

    layers = params["layers"]
    for name, qtype in (("wqkv", "Q8_0"), ("wo", "Q4_K"), ("w_down", "Q6_K")):
        assert isinstance(layers[name], GGUFBlocks) and layers[name].qtype == qtype, name
    assert isinstance(layers["w_gate_up"], np.ndarray) and layers["w_gate_up"].dtype == np.float32
    assert isinstance(params["embed"], np.ndarray) and cfg.tie_word_embeddings and "lm_head" not in params   # float32 in the file
    for i in range(L):
        b = f"blk.{i}."
        expected = {"wqkv": np.concatenate([deq(b + "attn_q.weight", H), deq(b + "attn_k.weight", HKV),
                                            deq(b + "attn_v.weight")]),
                    "wo": deq(b + "attn_output.weight"), "w_down": deq(b + "ffn_down.weight"),
                    "w_gate_up": np.concatenate([deq(b + "ffn_gate.weight"), deq(b + "ffn_up.weight")])}
        for name, w in expected.items():
            got = layers[name].dense()[i] if isinstance(layers[name], GGUFBlocks) else layers[name][i]
            np.testing.assert_array_equal(np.asarray(got), w, err_msg=f"{name} layer {i}")
    split = convert(params, "split")["layers"]   # no Q4_1 blocks left in this file: nothing split
    assert not any(isinstance(split[name], SplitBlocks) for name in split)


def test_q4_1_blocks_convert_to_the_split_layout(tmp_path):
    """A Q4_1 tensor written by gguf's own quantizer, as GGUFBlocks converted to the split layout: [d * q | m],
    which merges into gguf's dequantization exactly, whose parts are exact bfloat16 pairs, and which
    quantize_blocks reproduces from the float values (the same rounding)."""
    values = (0.1 * np.random.default_rng(0).standard_normal((8, 96))).astype(np.float32)
    values[0, :32] = 0.25   # a constant block: d = 0
    write_gguf(tmp_path / "q4_1.gguf", {"blk.0.ffn_up.weight": ("Q4_1", values)})
    tensor = read_gguf(str(tmp_path / "q4_1.gguf")).tensors[0]
    split = convert({"w": gguf_blocks(tensor)}, "split")["w"]
    assert isinstance(split, SplitBlocks) and split.data.shape == (8, 96 + 3)
    np.testing.assert_array_equal(np.asarray(split.dense()), dequantize(tensor, np.float32))
    data = np.asarray(split.data)
    hi = data.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(hi + (data - hi).astype(jnp.bfloat16).astype(np.float32), data)
    np.testing.assert_array_equal(quantize_blocks(values, 32).data, data)


def test_f32_copy_of_a_gguf_for_llama_perplexity(tmp_path):
    """eval-quant's F32 copy of a GGUF (llama.cpp's exact baseline): every tensor gguf's dequantization in F32, in
    the same shape; the metadata kept, the file type all-F32."""
    import gguf

    from xyjax.bench.eval_quant import write_f32_gguf

    values = (0.1 * np.random.default_rng(3).standard_normal((8, 256))).astype(np.float32)
    write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_up.weight": ("Q4_K", values), "blk.0.ffn_norm.weight": values[0],
                                     "token_embd.weight": ("Q8_0", values)}, {"llama.block_count": 1})
    write_f32_gguf(str(tmp_path / "q.gguf"), str(tmp_path / "f.gguf"))
    source, copy = (read_gguf(str(tmp_path / name)) for name in ("q.gguf", "f.gguf"))
    assert copy.fields["llama.block_count"].contents() == 1
    assert copy.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    for a, b in zip(source.tensors, copy.tensors, strict=True):
        assert b.name == a.name and b.tensor_type == gguf.GGMLQuantizationType.F32
        np.testing.assert_array_equal(np.asarray(b.data), dequantize(a, np.float32))
