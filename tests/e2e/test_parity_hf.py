"""The default model against HF transformers loading the same GGUF: last-position logits and greedy text.

Tokenizer encodings and chat templates against transformers' are in test_tokenizer_hf.py."""

import numpy as np
import pytest
import ref_venv
from helpers import reference_logits

from xyjax import SamplingParams

PARAGRAPH = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps as his father had "
             "done before him. Ships passed in the dark, their lanterns swaying, and the beam swept the water in "
             "long patient arcs. In winter the storms came from the north, and the keeper wrote in his logbook "
             "about the height of the waves, the colour of the sky, and the birds that sheltered on the rocks. ")


def long_text(n_paragraphs: int) -> str:
    return " ".join(f"Chapter {i + 1}. " + PARAGRAPH for i in range(n_paragraphs))


@pytest.fixture(scope="module")
def parity_prompts(default_llm):
    tok = default_llm.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=True)
    medium, long = tok.encode(long_text(4)), tok.encode(long_text(14))
    assert len(chat) < 64 and 250 <= len(medium) <= 400 and len(long) > 1000
    return {"short-chat": chat, "medium": medium, "long": long}


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers, ignoring EOS (a plain KV-cached loop)."""
    torch = ref_venv.importorskip("torch")

    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            r = model(x, past_key_values=past, use_cache=True)
            past, token = r.past_key_values, int(r.logits[0, -1].argmax())
            out.append(token)
            x = torch.tensor([[token]])
    return out


@pytest.mark.parametrize("name", ["short-chat", "medium", "long"])
def test_last_position_logits_match(name, default_llm, hf_reference, parity_prompts):
    torch = ref_venv.importorskip("torch")

    model, _ = hf_reference
    ids = parity_prompts[name]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    got = reference_logits(default_llm.model.config, default_llm.model.params, ids)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)
    assert got.argmax() == expected.argmax()


def test_greedy_continuations_identical(default_llm, hf_reference, parity_prompts):
    model, _ = hf_reference
    names = list(parity_prompts)
    outs = default_llm.generate([parity_prompts[n] for n in names],
                                SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    for name, out in zip(names, outs):
        assert out.token_ids == hf_greedy(model, parity_prompts[name], 24), name

