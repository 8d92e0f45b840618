"""M-RoPE positions and the vision tower's rotary ids, window order and attention segments equal
those of tiny randomly initialised Qwen2-VL and Qwen2.5-VL models built here."""

from __future__ import annotations

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime.mrope import (
    cu_seqlens,
    decode_positions,
    rope_index,
    vision_rotary_ids,
    window_index,
)

IMAGE_ID = 90
MERGE = 2
_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 100,
         "bos_token_id": 1, "eos_token_id": 2,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]}}
_IDS = {"image_token_id": IMAGE_ID, "video_token_id": 91, "vision_start_token_id": 92}
# Merged grids of 6 x 10, 8 x 8 (a whole empty padding window) and 3 x 2 against 4-token
# windows (window_size 112 px / patch 14 / merge 2): several windows, some ragged.
WINDOW_GRIDS = [(1, 12, 20), (1, 16, 16), (2, 6, 4)]


@pytest.fixture(scope="module")
def qwen2_vl():
    import torch
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=_TEXT, vision_config={
        "depth": 1, "embed_dim": 32, "num_heads": 2, "hidden_size": 64, "mlp_ratio": 2}, **_IDS)
    return Qwen2VLModel(cfg).eval()


@pytest.fixture(scope="module")
def qwen2_5_vl():
    import torch
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    torch.manual_seed(0)
    cfg = Qwen2_5_VLConfig(text_config=_TEXT, vision_config={
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
        "out_hidden_size": 64, "window_size": 112, "fullatt_block_indexes": [1]}, **_IDS)
    return Qwen2_5_VLModel(cfg).eval()


def _prompt(parts: list) -> np.ndarray:
    """Token ids: an int n is n text tokens (ids 3..), a grid is its run of image tokens."""
    rng = np.random.default_rng(len(parts))
    ids = []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(3, 80, part).tolist()
        else:
            ids += [IMAGE_ID] * (part[0] * part[1] * part[2] // MERGE**2)
    return np.asarray(ids, dtype=np.int64)


PROMPTS = [
    [(1, 4, 4)],  # the image first
    [3, (1, 4, 4), 5],
    [7, (1, 6, 10), 2],
    [1, (1, 12, 4)],  # the image last, taller than wide
    [4, (1, 6, 10), 3, (1, 12, 4), 2, (1, 4, 4), 6],
    [9],  # text only
]


def _hf_rope(model, ids: np.ndarray, grids: list):
    import torch

    out, delta = model.get_rope_index(
        torch.from_numpy(ids)[None], mm_token_type_ids=torch.from_numpy(
            (ids == IMAGE_ID).astype(np.int32))[None],
        image_grid_thw=torch.tensor(grids) if grids else None)
    return out[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize("parts", PROMPTS)
def test_rope_index_equals_get_rope_index(parts, qwen2_vl, qwen2_5_vl):
    ids = _prompt(parts)
    grids = [p for p in parts if not isinstance(p, int)]
    got = rope_index(ids, IMAGE_ID, grids, MERGE)
    assert got.positions.dtype == np.int64 and got.positions.shape == (3, len(ids))
    for model in (qwen2_vl, qwen2_5_vl):
        ref, delta = _hf_rope(model, ids, grids)
        assert np.array_equal(got.positions, ref) and got.delta == delta, parts
    if not grids:
        assert got.delta == 0 and np.array_equal(got.positions, np.tile(np.arange(9), (3, 1)))


def test_decode_positions_equal_compute_3d_position_ids(qwen2_vl):
    import torch
    from transformers import DynamicCache

    ids = _prompt([3, (1, 6, 10), 5])
    grid = [(1, 6, 10)]
    mm = torch.from_numpy((ids == IMAGE_ID).astype(np.int32))[None]
    qwen2_vl.rope_deltas = None
    prefill = qwen2_vl.compute_3d_position_ids(
        torch.from_numpy(ids)[None], None, image_grid_thw=torch.tensor(grid),
        mm_token_type_ids=mm)
    got = rope_index(ids, IMAGE_ID, grid, MERGE)
    assert np.array_equal(prefill[:, 0].numpy(), got.positions)
    for past, step in [(len(ids), 1), (len(ids) + 1, 3)]:  # a decode step, then a chunk
        cache = DynamicCache()  # a real cache holding `past` positions
        cache.update(torch.zeros(1, 1, past, 32), torch.zeros(1, 1, past, 32), layer_idx=0)
        ref = qwen2_vl.compute_3d_position_ids(None, torch.zeros(1, step, 64), cache=cache)
        assert np.array_equal(decode_positions(past, step, got.delta), ref[:, 0].numpy())


def _captured_vision_inputs(visual, grids: list) -> dict:
    """Run the vision tower on random patches and record what its rotary embedding and each
    block were given."""
    import torch

    seen = {}
    hooks = [visual.rotary_pos_emb.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("position_ids", args[1].numpy().copy()))]
    for i, block in enumerate(visual.blocks):
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: seen.__setitem__(i, kwargs["cu_seqlens"].numpy().copy()),
            with_kwargs=True))
    n = sum(t * h * w for t, h, w in grids)
    cfg = visual.config
    pixels = torch.randn(n, 3 * cfg.temporal_patch_size * cfg.patch_size**2)
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=torch.tensor(grids))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def test_qwen2_vl_vision_ids_and_segments_equal_the_model(qwen2_vl):
    grids = [(1, 4, 4), (1, 6, 10), (2, 12, 4)]
    seen = _captured_vision_inputs(qwen2_vl.visual, grids)
    ids = vision_rotary_ids(grids, MERGE)
    assert ids.dtype == np.int64 and np.array_equal(ids, seen["position_ids"])
    assert cu_seqlens(grids).dtype == np.int32 and np.array_equal(cu_seqlens(grids), seen[0])
    assert np.array_equal(vision_rotary_ids((1, 6, 10), MERGE), vision_rotary_ids(
        [(1, 6, 10)], MERGE))


def test_qwen2_5_vl_window_index_equals_the_model(qwen2_5_vl):
    import torch
    from transformers.vision_utils import get_vision_window_index

    visual, cfg = qwen2_5_vl.visual, qwen2_5_vl.visual.config
    seen = _captured_vision_inputs(visual, WINDOW_GRIDS)
    got = window_index(WINDOW_GRIDS, cfg.window_size, cfg.patch_size, cfg.spatial_merge_size)
    assert np.array_equal(vision_rotary_ids(WINDOW_GRIDS, MERGE), seen["position_ids"])
    assert np.array_equal(got.cu_seqlens, seen[0]) and got.cu_seqlens.dtype == np.int32
    assert np.array_equal(cu_seqlens(WINDOW_GRIDS), seen[1])  # fullatt_block_indexes = [1]
    assert len(got.cu_seqlens) > 10  # several windows, not one per image
    ref_index, ref_cu = get_vision_window_index(
        torch.tensor(WINDOW_GRIDS), spatial_merge_size=cfg.spatial_merge_size,
        window_size=cfg.window_size, patch_size=cfg.patch_size)
    assert got.index.dtype == np.int64 and np.array_equal(got.index, ref_index.numpy())
    assert np.array_equal(got.cu_seqlens, ref_cu.numpy())


def test_bad_inputs_are_user_errors():
    ids = _prompt([2, (1, 4, 4), 2])
    with pytest.raises(UserError, match="takes 15 image tokens but the prompt holds a run of 4"):
        rope_index(ids, IMAGE_ID, [(1, 6, 10)], MERGE)
    with pytest.raises(UserError, match="2 image grids were given"):
        rope_index(ids, IMAGE_ID, [(1, 4, 4), (1, 4, 4)], MERGE)
    with pytest.raises(UserError, match="more runs of image tokens"):
        rope_index(ids, IMAGE_ID, [], MERGE)
    with pytest.raises(UserError, match="1-D integer"):
        rope_index(ids[None], IMAGE_ID, [(1, 4, 4)], MERGE)
    with pytest.raises(UserError, match="multiple of the merge size"):
        vision_rotary_ids((1, 5, 4), MERGE)
    with pytest.raises(UserError, match="window_size=20"):
        window_index([(1, 4, 4)], 20, 14, MERGE)
    with pytest.raises(UserError, match="start=-1"):
        decode_positions(-1, 1, 0)
