"""`edgevlm init --text-from`: a pretrained causal LM under a vision tower keeps its logits."""

from __future__ import annotations

import json

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.models import create, load_model
from edgevlm.models.tokenizer import CHAT_TEMPLATE

TEXTS = ["the red circle is left of the blue square", "how many shapes are there?",
         "What is the capital of France? Paris.", "a green triangle\nand a yellow star"] * 8
VISION = {"vision_config": {"model_type": "siglip_vision_model", "hidden_size": 32,
                            "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
          "vision_feature_layer": -1, "vision_feature_select_strategy": "full"}


def lm_tokenizer(with_image: bool = False):
    """A byte-level BPE the way real LMs ship one: ChatML tokens, no <image>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS + (["<image>"] * 50 if with_image else []), trainer=trainer)
    if with_image:  # "<image>" as ordinary BPE merges, the way a careless tokenizer has it
        tok.model = models.BPE(vocab={**tok.get_vocab(), "<image>": tok.get_vocab_size()},
                               merges=[])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_lm(path, model_type="llama", tied=True, tokenizer=None):
    """A random causal LM and its tokenizer saved as a Hugging Face folder (ffn_down 256 wide,
    so a GGUF of it can hold a Q8_K tensor)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tokenizer or lm_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64,
                               intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256,
                               tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def vision_config(tmp_path):
    path = tmp_path / "vision.json"
    path.write_text(json.dumps(VISION))
    return path


def text_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("model_type,tied", [("llama", True), ("qwen2", False)])
def test_text_only_logits_equal_the_lms(tmp_path, model_type, tied):
    lm, tok = save_lm(tmp_path / "lm", model_type, tied)
    create(tmp_path / "vlm", config_path=vision_config(tmp_path), text_from=tmp_path / "lm")
    vlm = load_model(tmp_path / "vlm")
    new_tok = vlm.processor.tokenizer
    assert len(new_tok) == len(tok) + 1 and vlm.image_token_id == len(tok)
    assert new_tok.chat_template == tok.chat_template
    assert vlm.model.config.text_config.tie_word_embeddings is tied
    lm_head, emb = vlm.model.lm_head.weight, vlm.model.model.language_model.embed_tokens.weight
    assert (lm_head.data_ptr() == emb.data_ptr()) is tied
    for text in ("the blue square", "how many shapes?\nthree"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert new_tok(text, add_special_tokens=False)["input_ids"] == ids
        ours, ref = text_logits(vlm.model, ids), text_logits(lm, ids)
        assert ours.shape[-1] == ref.shape[-1] + 1  # the <image> column
        assert torch.equal(ours[:, : ref.shape[-1]], ref)
    # "<image>" is one token inside a prompt, not seven bytes
    ids = new_tok("look <image>\nwhat?", add_special_tokens=False)["input_ids"]
    assert ids.count(vlm.image_token_id) == 1
    cfg = json.loads((tmp_path / "vlm" / "config.json").read_text())
    assert "quantization_config" not in cfg["text_config"]


def test_a_tokenizer_with_a_special_image_token_is_reused(tmp_path, tokenizer):
    save_lm(tmp_path / "lm", tokenizer=tokenizer)  # the project's own BPE binds <image> already
    vlm = create(tmp_path / "vlm", config_path=vision_config(tmp_path), text_from=tmp_path / "lm")
    assert len(vlm.processor.tokenizer) == len(tokenizer)
    assert vlm.image_token_id == tokenizer.convert_tokens_to_ids("<image>")


def test_vision_from_supplies_the_tower(tmp_path, micro_model_dir):
    save_lm(tmp_path / "lm")
    vlm = create(tmp_path / "vlm", vision_from=micro_model_dir, text_from=tmp_path / "lm")
    src = load_model(micro_model_dir).model.model.vision_tower.state_dict()
    for name, w in vlm.model.model.vision_tower.state_dict().items():
        assert torch.equal(w, src[name]), name


def test_bad_language_models_are_named(tmp_path, micro_model_dir, shapes_dir):
    vision = vision_config(tmp_path)
    save_lm(tmp_path / "lm")
    cases = [
        (dict(text_from=micro_model_dir), "model_type 'llava' is not a supported causal LM"),
        (dict(text_from=tmp_path / "nothing"), "not a folder or a .gguf file"),
        (dict(text_from=tmp_path / "lm", tokenizer_data=[shapes_dir / "train.json"]),
         "brings the LM's own tokenizer"),
        (dict(text_from=tmp_path / "lm", tokenizer_from=micro_model_dir),
         "brings the LM's own tokenizer"),
    ]
    bart = tmp_path / "bart"
    bart.mkdir()
    (bart / "config.json").write_text(json.dumps({"model_type": "bart"}))
    cases.append((dict(text_from=bart), "model_type 'bart' is not a supported causal LM"))
    seq = tmp_path / "seqcls"
    seq.mkdir()
    (seq / "config.json").write_text(json.dumps({"model_type": "llama", "architectures":
                                                 ["LlamaForSequenceClassification"]}))
    cases.append((dict(text_from=seq), "is not a causal LM"))
    for kw, message in cases:
        with pytest.raises(UserError, match=message):
            create(tmp_path / "out", config_path=vision, **kw)
        assert not (tmp_path / "out").exists()


def test_image_bound_to_an_ordinary_token_is_refused(tmp_path):
    tok = lm_tokenizer(with_image=True)
    assert "<image>" in tok.get_vocab()
    save_lm(tmp_path / "lm", tokenizer=tok)
    with pytest.raises(UserError, match="<image> as an ordinary token"):
        create(tmp_path / "out", config_path=vision_config(tmp_path), text_from=tmp_path / "lm")
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_before_loading(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists"):
        create(tmp_path / "out", config_path=vision_config(tmp_path), text_from=tmp_path / "x")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def write_gguf(tmp_path, **kw):
    from tests.edgevlm.gguf_file import write_llama_gguf

    lm, tok = save_lm(tmp_path / "hf", tied=True)
    (tmp_path / "gguf").mkdir()
    path = write_llama_gguf(lm, tok, tmp_path / "gguf" / "lm.gguf", **kw)
    return lm, tok, path


def test_a_gguf_lm_is_dequantized_once_and_keeps_its_logits(tmp_path):
    lm, tok, path = write_gguf(tmp_path, tensor_type="F32")
    create(tmp_path / "vlm", config_path=vision_config(tmp_path), text_from=path)
    assert sorted(p.name for p in (tmp_path / "vlm").glob("*.safetensors")) == ["model.safetensors"]
    vlm = load_model(tmp_path / "vlm")
    assert vlm.model.config.text_config.tie_word_embeddings is True
    ids = tok("the red circle is left of the blue square", add_special_tokens=False)["input_ids"]
    assert vlm.processor.tokenizer("the red circle is left of the blue square",
                                   add_special_tokens=False)["input_ids"] == ids
    ours, ref = text_logits(vlm.model, ids), text_logits(lm, ids)
    assert (ours[:, : ref.shape[-1]] - ref).abs().max() < 1e-5


def test_gguf_quant_types_and_architectures_it_cannot_read_are_named(tmp_path):
    from tests.edgevlm.gguf_file import REFUSED_TYPE

    vision = vision_config(tmp_path)
    _, _, bad_type = write_gguf(tmp_path / "a", tensor_types={"blk.0.ffn_down.weight":
                                                              REFUSED_TYPE})
    with pytest.raises(UserError, match=f"blk.0.ffn_down.weight is {REFUSED_TYPE}, which the "
                                        "gguf package cannot dequantize"):
        create(tmp_path / "out", config_path=vision, text_from=bad_type)
    _, _, bad_arch = write_gguf(tmp_path / "b", architecture="edgevlm-unknown")
    with pytest.raises(UserError, match="GGUF architecture 'edgevlm-unknown' is not supported"):
        create(tmp_path / "out", config_path=vision, text_from=bad_arch)
    assert not (tmp_path / "out").exists()
