"""What an export is checked against: torch's outputs on the validation inputs (`Reference`,
made by edgevlm.export.validate) and the float32 bound both the validation and the quantized
graph check (edgevlm.export.graph_check) hold to."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP32_MAX_ABS = 1e-4  # fp32 graphs match torch to float rounding


@dataclass(frozen=True)
class Reference:
    """Torch outputs on the validation inputs (numpy, float32)."""

    pixel_values: np.ndarray  # (2, 3, H, W); idefics3: (2, N_tiles, 3, S, S)
    image_features: np.ndarray  # (2, N_img, D); idefics3: (2·N_tiles, T, D), as the graph gives
    input_ids: np.ndarray  # (1, S) int64, <image> expanded
    inputs_embeds: np.ndarray  # (1, S, D) token embeddings, before the image scatter
    prompt_logits: np.ndarray  # (1, S, V) decoder on the merged prompt
    tokens: list[int]  # greedy continuation
    step_logits: np.ndarray  # (new_tokens, V) raw logits of each greedy step
    image_token_id: int
    suppressed: list[int]  # end-of-sequence ids kept from being chosen
    step_embeds: np.ndarray | None = None  # (new_tokens, D) token embeddings of `tokens`
    merge_features: np.ndarray | None = None  # (N_image_tokens, D): the first image's, which
    # fill the prompt's image slots (None: image_features[0])
    vision_feeds: list[dict] | None = None  # a patch graph (Qwen2-VL): each image's feeds;
    # image_features is then every image's tokens, concatenated
    positions: np.ndarray | None = None  # M-RoPE: the prompt's (3, 1, S) position ids
    rope_delta: int = 0  # M-RoPE: a generated token at cache length P sits at P + rope_delta

    @property
    def slot_features(self) -> np.ndarray:
        if self.merge_features is not None:
            return self.merge_features
        return self.image_features[0].reshape(-1, self.image_features.shape[-1])


def step_positions(ref: Reference, start: int) -> np.ndarray | None:
    """M-RoPE: a generated token's three equal position streams at start + rope_delta, (3, 1, 1);
    None for a 1-D decoder."""
    if ref.positions is None:
        return None
    return np.full((3, 1, 1), start + ref.rope_delta, np.int64)
