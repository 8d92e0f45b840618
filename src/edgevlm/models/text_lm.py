"""`edgevlm init --text-from LM`: a pretrained causal LM under a vision tower and a new projector.

This is how LLaVA itself is made (Liu et al., 2023): a pretrained language model (Vicuna, Qwen2,
SmolLM2), a vision encoder, and a freshly initialised projector between them. LM is a Hugging
Face causal-LM folder or a `.gguf` file; a GGUF is dequantized once by transformers' GGUF loader
(which needs the `gguf` package) and the result is saved as an ordinary safetensors folder.

The tokenizer and chat template are the LM's own, with `<image>` added as one special token (a
new row in the embedding, initialised to the mean of the others as `resize_token_embeddings`
does). Tied embeddings stay tied. The LLaVA model's text-only logits over the LM's vocabulary are
the LM's logits.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgevlm.errors import UserError

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# GGUF `general.architecture` -> the transformers text model_type we support.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Config keys that describe where the LM came from, not what it is.
_DROP_KEYS = ("quantization_config", "_name_or_path", "architectures", "transformers_version",
              "dtype", "torch_dtype", "auto_map", "_commit_hash")


@dataclass(frozen=True)
class TextLM:
    model: Any  # LlamaForCausalLM / Qwen2ForCausalLM, float32
    tokenizer: Any  # the LM's tokenizer, `<image>` added
    source: str  # the folder or file it came from
    added_image_token: bool  # False: the tokenizer already had <image> as a special token


def _gguf_check(path: Path) -> str:
    """The text model_type of a GGUF file, after checking every tensor type dequantizes."""
    try:
        import numpy as np
        from gguf import GGUFReader, dequantize
    except ImportError as e:
        raise UserError("reading a .gguf file needs the gguf package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"--text-from {path} is not a readable GGUF file ({e})") from e
    field = reader.fields.get("general.architecture")
    if field is None:
        raise UserError(f"--text-from {path}: the GGUF has no general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode()
    if arch not in GGUF_ARCHITECTURES:
        raise UserError(f"--text-from {path}: GGUF architecture {arch!r} is not supported; "
                        f"edgevlm takes {', '.join(GGUF_ARCHITECTURES)} language models")
    # One tensor of each type is enough to learn whether transformers' loader (gguf.dequantize)
    # can read the file, before it spends a minute converting the others.
    seen = {}
    for t in reader.tensors:
        seen.setdefault(t.tensor_type, t)
    for qtype, t in seen.items():
        try:
            dequantize(np.asarray(t.data), qtype)
        except NotImplementedError as e:
            raise UserError(f"--text-from {path}: tensor {t.name} is {qtype.name}, which the gguf "
                            "package cannot dequantize; convert the model to F16, Q8_0 or Q4_0 "
                            "(llama-quantize) or give the Hugging Face folder") from e
    return GGUF_ARCHITECTURES[arch]


def _hf_check(path: Path) -> str:
    import json

    from edgevlm.families.backbones import TEXT_MODEL_TYPES

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"--text-from {path}: no config.json; give a Hugging Face causal-LM "
                        "folder or a .gguf file")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"--text-from {cfg_path} is not valid JSON ({e})") from e
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type not in TEXT_MODEL_TYPES:
        raise UserError(f"--text-from {path}: model_type {model_type!r} is not a supported causal "
                        f"LM; edgevlm takes {', '.join(TEXT_MODEL_TYPES)} language models")
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UserError(f"--text-from {path}: architectures {archs} is not a causal LM; give a "
                        "*ForCausalLM checkpoint")
    return model_type


def _with_image_token(tokenizer, where: str):
    """The tokenizer with `<image>` as a special token; returns (tokenizer, added)."""
    from transformers import AutoTokenizer

    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN in vocab:
        added = tokenizer.added_tokens_decoder.get(vocab[IMAGE_TOKEN])
        if added is None or not added.special:
            raise UserError(f"--text-from {where}: its tokenizer already has {IMAGE_TOKEN} as an "
                            f"ordinary token (id {vocab[IMAGE_TOKEN]}), so image positions could "
                            "not be told from text; use an LM whose tokenizer lacks it or binds it "
                            "as a special token")
    with tempfile.TemporaryDirectory() as tmp:
        # Reloading with extra_special_tokens is transformers' own way to name an image token:
        # the saved tokenizer_config carries it, and LlavaProcessor reads tokenizer.image_token.
        tokenizer.save_pretrained(tmp)
        tok = AutoTokenizer.from_pretrained(tmp, extra_special_tokens={"image_token": IMAGE_TOKEN})
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.warning("%s: the tokenizer has no pad token; padding with eos %r", where, tok.eos_token)
    if not tok.chat_template:
        from edgevlm.models.tokenizer import CHAT_TEMPLATE

        tok.chat_template = CHAT_TEMPLATE
        log.warning("%s: the tokenizer has no chat template; using ChatML", where)
    else:  # a text-only template (SmolLM2's) learns to take image parts
        from edgevlm.models.tokenizer import with_image_parts
        from edgevlm.runtime.chat import special_tokens_from_config

        specials = special_tokens_from_config({k: getattr(tok, k, None) for k in (
            "bos_token", "eos_token", "pad_token", "unk_token")})
        tok.chat_template = with_image_parts(tok.chat_template, specials)
    return tok, IMAGE_TOKEN not in vocab


def load_text_lm(path: str | Path) -> TextLM:
    """A supported causal LM (HF folder or .gguf) in float32, its tokenizer given `<image>`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        _gguf_check(path)
        kw = {"gguf_file": path.name}
        folder = path.parent
    elif path.is_dir():
        _hf_check(path)
        kw, folder = {}, path
    else:
        raise UserError(f"--text-from {path}: not a folder or a .gguf file")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"--text-from {path}: transformers could not load it ({e})") from e
    tokenizer, added = _with_image_token(tokenizer, str(path))
    if added:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.eval()
    return TextLM(model, tokenizer, str(path), added)


def text_config_of(lm: TextLM) -> dict:
    """The LM's config as a LLaVA text_config: what it is, not where it came from."""
    cfg = lm.model.config.to_dict()
    for key in _DROP_KEYS:
        cfg.pop(key, None)
    cfg["vocab_size"] = len(lm.tokenizer)
    return cfg


def graft(loaded, lm: TextLM) -> None:
    """Copy the LM's weights into a LLaVA model built from `text_config_of(lm)`."""
    import torch

    from edgevlm.families import part

    model = loaded.model
    state = dict(lm.model.model.state_dict())
    src = state.pop("embed_tokens.weight")  # (V_lm, D)
    text = part(model, "language_model")
    with torch.no_grad():
        missing, unexpected = text.load_state_dict(state, strict=False)
        # a Qwen2 decoder under a Llama LM (Qwen2-VL's): q/k/v biases the LM lacks, set to zero,
        # so the layer computes exactly what the LM's does
        biases = [n for n in missing if n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
        for name in biases:
            text.get_parameter(name).zero_()
        assert sorted(set(missing) - set(biases)) == ["embed_tokens.weight"] and not unexpected, \
            f"LM weights do not fit: {missing} {unexpected}"
        # A family whose processor adds tokens (Idefics3's image markers) has more rows than
        # the LM: the LM's rows are copied, the new ones start at the mean embedding.
        emb = text.embed_tokens.weight  # (V, D), V >= V_lm
        assert emb.shape[0] >= src.shape[0], (emb.shape, src.shape)
        emb[: src.shape[0]] = src
        emb[src.shape[0]:] = src.mean(0)
        if model.config.text_config.tie_word_embeddings:
            model.tie_weights()
            assert part(model, "lm_head").weight.data_ptr() == emb.data_ptr(), "lm_head is not tied"
        else:
            head = lm.model.lm_head.weight
            part(model, "lm_head").weight[: head.shape[0]] = head
            part(model, "lm_head").weight[head.shape[0]:] = head.mean(0)
