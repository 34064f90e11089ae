"""The GGUF loader on synthetic files: the Q/K permutation, bad files, the Q4_1 split layout."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.gguf_loader import dequantize, permute_qk, read_gguf, split_q4_1, unpermute_qk
from xyjax.ops.gemm.formats import SplitBlocks, quantize_blocks


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
    with pytest.raises(ValueError, match="token_embd.weight.*Q8_K"):
        dequantize(tensor, np.float32)


def test_q4_1_split_layout_is_the_files_weights(tmp_path):
    """A Q4_1 tensor written by gguf's own quantizer: split_q4_1 gives [d * q | m], which merges into gguf's
    dequantization exactly, whose parts are exact bfloat16 pairs, and which quantize_blocks
    reproduces from the float values (the same rounding)."""
    gguf = pytest.importorskip("gguf")

    values = (0.1 * np.random.default_rng(0).standard_normal((8, 96))).astype(np.float32)
    values[0, :32] = 0.25   # a constant block: d = 0
    path = tmp_path / "q4_1.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_1),
                 raw_dtype=gguf.GGMLQuantizationType.Q4_1)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    tensor = read_gguf(str(path)).tensors[0]
    split = split_q4_1(tensor)
    assert split.shape == (8, 96 + 3)
    np.testing.assert_array_equal(SplitBlocks(split, 32).dense(), dequantize(tensor, np.float32))
    hi = split.astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(hi + (split - hi).astype(jnp.bfloat16).astype(np.float32), split)
    np.testing.assert_array_equal(quantize_blocks(values, 32).data, split)
