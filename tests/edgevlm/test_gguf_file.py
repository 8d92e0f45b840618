"""The GGUF test helper: a tiny Llama and its tokenizer survive transformers' GGUF loader
exactly, and the refusals it is meant to provoke (an undequantizable type, an unknown
architecture) happen."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgevlm.models.tokenizer import train_tokenizer
from tests.edgevlm.gguf_file import REFUSED_TYPE, write_llama_gguf

TEXTS = [
    "the cat sat on the mat", "a dog ran in the park", "the sun is bright today",
    "what colour is the square?", "the circle is red", "there are two triangles",
    "a small blue box", "the big green ball", "is the star yellow?", "yes, it is yellow",
    "no, it is purple", "count the shapes", "three shapes in the picture", "the red one is left",
    "the blue one is on the right", "describe the image", "a picture of a house",
    "the tree is tall", "birds fly over the lake", "she reads a book",
    "he writes a letter", "we walk to school", "they play in the garden", "it rains at night",
    "the moon is full", "open the door please", "close the window", "the answer is four",
    "how many circles?", "one circle and two squares",
]

STRINGS = [
    "the cat sat on the mat",
    "line one\nline two\n\n  indented\tand tabbed",
    "<|im_start|>user\n<image>\nwhat colour is the square?<|im_end|>\n<|im_start|>assistant\n",
    " leading space, trailing space ",
    "unseen words: zebra quixotic 42, ünïcode 字",
    "<|endoftext|>",
]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, 400)


def _tiny_llama(vocab_size: int, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # GQA (4 heads over 2 kv heads) so a wrong q/k permutation cannot cancel out; intermediate
    # 256 so ffn_down's rows fit a Q8_K block
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=tied)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("tied", [True, False])
def test_roundtrip_through_transformers(tokenizer, tmp_path, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _tiny_llama(len(tokenizer), tied)
    write_llama_gguf(model, tokenizer, tmp_path / "m.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")

    assert loaded.config.tie_word_embeddings is tied
    shares = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert shares is tied
    ids = torch.randint(0, len(tokenizer), (3, 12), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = torch.tensor(tokenizer.encode(STRINGS[2])[:4])  # special tokens too
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)

    for s in STRINGS:
        assert tok.encode(s) == tokenizer.encode(s), s
        assert tok.decode(tok.encode(s)) == tokenizer.decode(tokenizer.encode(s)), s
    assert tok.chat_template == tokenizer.chat_template
    messages = [{"role": "user", "content": "<image>\nhow many circles?"}]
    assert (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_refused_type_is_a_real_q8_k_that_transformers_cannot_dequantize(tokenizer, tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(len(tokenizer), tied=True)
    name = "blk.0.ffn_down.weight"
    write_llama_gguf(model, tokenizer, tmp_path / "m.gguf", tensor_types={name: REFUSED_TYPE})

    # the bytes are ggml's block_q8_K (f32 d, int8 qs[256], int16 bsums[16]): they decode to the
    # weight within half a step
    (t,) = [t for t in GGUFReader(tmp_path / "m.gguf").tensors if t.name == name]
    assert t.tensor_type.name == REFUSED_TYPE
    blocks = np.asarray(t.data).reshape(-1, 292)
    d = blocks[:, :4].copy().view("<f4")
    qs = blocks[:, 4:260].view(np.int8).astype(np.float32)
    w = model.model.layers[0].mlp.down_proj.weight.detach().numpy().reshape(-1, 256)
    assert np.all(np.abs(d * qs - w) <= np.abs(d) / 2 + 1e-7)

    with pytest.raises(NotImplementedError, match="Q8_K"):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


def test_unknown_architecture_is_refused_by_name(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama(len(tokenizer), tied=True)
    write_llama_gguf(model, tokenizer, tmp_path / "m.gguf", architecture="edgevlm-unknown")
    with pytest.raises(ValueError, match="edgevlm-unknown is not supported"):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf")


def test_bad_requests_name_the_tensor(tokenizer, tmp_path):
    model = _tiny_llama(len(tokenizer), tied=True)
    with pytest.raises(ValueError, match="token_embd.weight: Q8_K packs rows in blocks of 256"):
        write_llama_gguf(model, tokenizer, tmp_path / "m.gguf", tensor_type=REFUSED_TYPE)
    with pytest.raises(ValueError, match=r"tensor_types names \['blk.9.nope'\]"):
        write_llama_gguf(model, tokenizer, tmp_path / "m.gguf", tensor_types={"blk.9.nope": "F16"})
    assert not list(tmp_path.iterdir())
