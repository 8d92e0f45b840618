"""Write a tiny Llama causal LM and its byte-level BPE tokenizer as a GGUF file, for tests.

So tests can exercise `from_pretrained(dir, gguf_file=...)` without downloading a checkpoint. The
layout follows llama.cpp's `convert_hf_to_gguf.py` (LlamaModel) and the GGUF spec
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): `{arch}.*` hyperparameter keys,
`tokenizer.ggml.*` keys for a "gpt2" (byte-level BPE) vocabulary, q/k rows permuted into
llama.cpp's rotary layout, and no `output.weight` when the head is tied to the embedding.

`REFUSED_TYPE` is a real ggml type that transformers cannot load: for llama its loader
dequantizes with `gguf.quants.dequantize`, which has no Q8_K, Q8_1 or Q1_0 implementation and
raises NotImplementedError. Of those, Q8_K is the one whose block layout gguf-py and ggml agree
on (gguf-py sizes Q8_1 at 40 bytes where ggml's `block_q8_1` is 36), so it is the one written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

REFUSED_TYPE = "Q8_K"

_Q8_K_BLOCK = 256  # values per block: f32 scale, 256 int8 quants, 16 int16 sums of 16


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary halves -> llama.cpp's interleaved pairs (convert_hf_to_gguf's `permute`).

    transformers' LlamaTensorProcessor applies the inverse on load.
    """
    pairs = w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


def _pack_q8_k(w: np.ndarray) -> np.ndarray:
    """ggml's `quantize_row_q8_K_ref`, row-major: (rows, cols) f32 -> (rows, cols/256*292) uint8."""
    blocks = w.astype(np.float32).reshape(-1, _Q8_K_BLOCK)
    # ggml scales by the signed value of largest magnitude, so that value maps to exactly -127
    signed_max = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    zero = np.zeros_like(signed_max)
    iscale = np.divide(np.float32(-127), signed_max, out=zero.copy(), where=signed_max != 0)
    qs = np.minimum(127, np.rint(iscale[:, None] * blocks)).astype(np.int8)
    bsums = qs.reshape(len(blocks), 16, 16).sum(axis=2, dtype=np.int16)
    d = np.divide(np.float32(1), iscale, out=zero.copy(), where=iscale != 0)  # an all-zero block: 0
    d_bytes = d.astype("<f4")[:, None].view(np.uint8)
    bsums_bytes = bsums.astype("<i2").view(np.uint8)
    packed = np.concatenate([d_bytes, qs.view(np.uint8), bsums_bytes], axis=1)
    return packed.reshape(w.shape[0], -1)


def _add_weight(writer, name: str, w: np.ndarray, type_name: str) -> None:
    """Add one tensor to `writer` stored as `type_name` (F32, F16, a gguf.quants type, or Q8_K)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

    qtype = getattr(GGMLQuantizationType, type_name, None)
    if qtype is None:
        raise ValueError(
            f"{name}: unknown ggml type {type_name!r}; use e.g. F32, F16, Q8_0, {REFUSED_TYPE}"
        )
    if qtype == GGMLQuantizationType.F32:
        writer.add_tensor(name, w.astype(np.float32))
        return
    if qtype == GGMLQuantizationType.F16:
        writer.add_tensor(name, w.astype(np.float16))
        return
    block = GGML_QUANT_SIZES[qtype][0]
    if w.shape[-1] % block:
        raise ValueError(
            f"{name}: {type_name} packs rows in blocks of {block} values, and this tensor's rows "
            f"have {w.shape[-1]}; pick a tensor whose input width is a multiple of {block}"
        )
    if qtype == GGMLQuantizationType.Q8_K:
        packed = _pack_q8_k(w)  # gguf.quants cannot pack it either
    else:
        try:
            packed = quants.quantize(w.astype(np.float32), qtype)
        except NotImplementedError as e:
            raise ValueError(
                f"{name}: gguf-py cannot pack {type_name} ({e}); "
                f"use {REFUSED_TYPE} or a type gguf.quants implements"
            ) from e
    writer.add_tensor(name, packed, raw_dtype=qtype)


def _tokenizer_fields(tokenizer, vocab_size: int):
    """(tokens, token types, merges) as llama.cpp's `_set_vocab_gpt2` writes them."""
    import json

    from gguf import TokenType

    vocab = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise ValueError(
            f"tokenizer has {len(vocab)} tokens but the model's embedding only {vocab_size} rows"
        )
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
    special = {t.content for t in added if t.special}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows past the vocabulary: llama.cpp pads with these
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.CONTROL if by_id[i] in special else TokenType.NORMAL)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model["type"] != "BPE":
        raise ValueError(f"tokenizer model is {model['type']}; only byte-level BPE is written")
    # tokenizers >= 0.20 stores merges as pairs, GGUF as "a b" strings
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def write_llama_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    tensor_type: str = "F32",
    architecture: str = "llama",
    tensor_types: Mapping[str, str] | None = None,
) -> Path:
    """Write `model` (a LlamaForCausalLM) and `tokenizer` (byte-level BPE, fast) to `path`.

    tensor_type: ggml type of every 2-D weight ("F32", "F16", or any type gguf.quants packs, e.g.
        "Q8_0"); norms stay F32 as llama.cpp keeps them.
    architecture: the `general.architecture` string and metadata key prefix. Tensors are always in
        llama's layout, so anything but "llama" is for testing a loader's refusal of the name.
    tensor_types: per-tensor overrides by GGUF name, e.g. {"blk.0.ffn_down.weight": REFUSED_TYPE}
        (Q8_K needs rows of a multiple of 256 values: ffn_down when intermediate_size is 256).
    """
    import gguf

    cfg = model.config
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ValueError("model has attention/MLP biases; this writer handles bias-free Llama only")
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {rope['rope_type']!r} is not written; use default rope")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    tied = bool(cfg.tie_word_embeddings)
    vocab_size = model.get_input_embeddings().weight.shape[0]

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    tensors = {}  # gguf name -> (array in HF (out, in) order, whether it is a matrix)
    for hf_name, p in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            # llama.cpp writes no output.weight for a tied head; the loader reads that as tied
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        assert gguf_name is not None, f"no GGUF name for {hf_name}"
        w = p.detach().float().cpu().numpy()
        if gguf_name.endswith("attn_q.weight"):
            w = _permute(w, n_head)
        elif gguf_name.endswith("attn_k.weight"):
            w = _permute(w, n_kv)
        tensors[gguf_name] = w
    overrides = dict(tensor_types or {})
    if unknown := sorted(set(overrides) - set(tensors)):
        raise ValueError(
            f"tensor_types names {unknown}, not in this model's tensors {sorted(tensors)}"
        )

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # renamed when whole, so no half file looks finished
    writer = gguf.GGUFWriter(tmp, architecture)
    writer.add_name(getattr(cfg, "_name_or_path", "") or "edgevlm-tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab_size)
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16}
    writer.add_file_type(file_type.get(tensor_type, gguf.LlamaFileType.GUESSED))

    tokens, types, merges = _tokenizer_fields(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which ByteLevel(use_regex=True) uses
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if (token_id := getattr(tokenizer, attr)) is not None:
            add(token_id)
    writer.add_add_bos_token(False)  # our tokenizer adds nothing around the text
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    for name, w in tensors.items():
        default = tensor_type if w.ndim == 2 else "F32"
        _add_weight(writer, name, w, overrides.get(name, default))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path
