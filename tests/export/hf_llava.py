"""A LLaVA made with transformers alone, outside edgevlm's presets and `init`: what a user
brings. A SigLIP tower (full-size: 224 px, 16-px patches, 768 wide, 12 layers, as
google/siglip-base-patch16-224) under a small Llama, a LlavaProcessor with SigLIP's image
processor and a tokenizer whose chat template takes text only, as most language models' do.
Random weights: nothing downloads. Used by tests (at a reduced size) and by hand:

    python -m tests.export.hf_llava OUT [--full]
"""

from __future__ import annotations

import sys
from pathlib import Path

# a text-only template (SmolLM2's shape: content is concatenated as a string)
TEXT_ONLY_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FULL_VISION = dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                   num_hidden_layers=12, num_attention_heads=12)
SMALL_VISION = dict(image_size=64, patch_size=16, hidden_size=128, intermediate_size=512,
                    num_hidden_layers=2, num_attention_heads=4)


def build(out: Path, vision: dict = SMALL_VISION, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
    words = ["What color is the circle? red blue green yellow square triangle user assistant"]
    tok.train_from_iterator(words * 50, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", extra_special_tokens={
                                       "image_token": "<image>"})
    fast.chat_template = TEXT_ONLY_TEMPLATE
    n_img = (vision["image_size"] // vision["patch_size"]) ** 2
    cfg = LlavaConfig(
        vision_config=SiglipVisionConfig(**vision),
        text_config=LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                                num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=512,
                                tie_word_embeddings=True),
        image_token_index=fast.convert_tokens_to_ids("<image>"), image_seq_length=n_img,
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    size = vision["image_size"]
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": size, "width": size}),
        tokenizer=fast, patch_size=vision["patch_size"], vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=TEXT_ONLY_TEMPLATE)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]), FULL_VISION if "--full" in sys.argv else SMALL_VISION)
