"""Qwen2-VL / Qwen2.5-VL position ids in numpy: the decoder's multimodal RoPE (M-RoPE) and the
vision tower's 2-D rotary ids, window order and attention segments.

M-RoPE (Qwen2-VL, arXiv:2409.12191, section 2.1) gives every token three position streams
(temporal, height, width). Text tokens carry one position in all three; the tokens of an image
of llm grid (t, h/m, w/m) carry (start + t', start + h', start + w'), and the text after it
resumes at start + max(h, w) / m. Decoding steps then sit at `cache_length + delta`.

The vision tower ropes each patch by its (row, col), listed merge block by merge block; Qwen2.5-VL
also attends within windows of window_size pixels, reordering merged tokens window by window.
Every function here equals its transformers counterpart (named in its docstring) in value and
dtype, so the exported graphs can take these as inputs instead of computing them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from edgevlm.errors import UserError
from edgevlm.runtime.limits import shown

Grid = tuple[int, int, int]


class RopeIndex(NamedTuple):
    """A prompt's M-RoPE positions and the offset its decoding steps continue from."""

    positions: np.ndarray  # (3, S) int64: temporal, height, width streams
    delta: int  # max position + 1 - S: decode step i sits at position i + delta


class WindowIndex(NamedTuple):
    """Qwen2.5-VL's window attention layout for the merged tokens of a set of images."""

    index: np.ndarray  # (N / merge^2,) int64: merged token order, window by window
    cu_seqlens: np.ndarray  # (windows + 1,) int32 cumulative window lengths in patches


def _int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise UserError(f"{name}={shown(value)} must be an integer of at least {low}")
    return int(value)


def _grids(grids, merge: int) -> list[Grid]:
    """`grids` (one (t, h, w) or a sequence of them, as image_grid_thw) as tuples of ints, h and
    w multiples of `merge` as the vision tower's patch merger needs."""
    rows = np.asarray(grids, dtype=object)
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[1] != 3:
        raise UserError(f"image grids {shown(grids)} must be (t, h, w) triples")
    out = []
    for row in rows.tolist():
        t, h, w = (_int(g, "image grid (t, h, w) entry") for g in row)
        if h % merge or w % merge:
            raise UserError(f"image grid {(t, h, w)} has h or w not a multiple of the merge size "
                            f"{merge}; take grids from patches.patchify")
        out.append((t, h, w))
    return out


def rope_index(input_ids, image_token_id: int, grids, spatial_merge_size: int) -> RopeIndex:
    """M-RoPE positions for one prompt (batch 1, no padding) whose images are the runs of
    `image_token_id`, one run per grid in order: `Qwen2VLModel.get_rope_index` (and
    Qwen2.5-VL's, equal for images). A text-only prompt gets 0..S-1 in all three, delta 0."""
    merge = _int(spatial_merge_size, "spatial_merge_size")
    ids = np.asarray(input_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"input_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    grids = [] if grids is None or len(grids) == 0 else _grids(grids, merge)
    is_image = ids == image_token_id
    bounds = [0, *(np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1).tolist(), len(ids)]
    pieces, pos, left = [], 0, list(grids)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            continue
        if not is_image[start]:
            pieces.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + pos,
                                          (3, end - start)))
            pos += end - start
            continue
        grid = _next_grid(left, end - start, merge, len(grids))
        pieces.append(_image_positions(pos, grid, merge))
        pos += max(grid[1], grid[2]) // merge
    if left:
        raise UserError(f"{len(grids)} image grids were given but the prompt holds "
                        f"{len(grids) - len(left)} runs of image tokens; expand each image's "
                        "placeholder with patches.expand_image_pad")
    if not pieces:
        return RopeIndex(np.zeros((3, 0), dtype=np.int64), 0)
    positions = np.concatenate(pieces, axis=1)
    return RopeIndex(positions, int(positions.max()) + 1 - len(ids))


def _next_grid(left: list[Grid], run: int, merge: int, total: int) -> Grid:
    """The next image's grid, checked against the `run` image tokens that stand for it."""
    if not left:
        raise UserError(f"the prompt holds more runs of image tokens than the {total} image "
                        "grids given; give one grid per image")
    grid = left.pop(0)
    tokens = grid[0] * grid[1] * grid[2] // merge**2
    if tokens != run:
        raise UserError(f"an image of grid {grid} takes {tokens} image tokens but the prompt "
                        f"holds a run of {run}; expand its placeholder with "
                        "patches.expand_image_pad (images need text between them)")
    return grid


def _image_positions(start: int, grid: Grid, merge: int) -> np.ndarray:
    """(3, t * h/m * w/m) positions of one image's tokens: `Qwen2VLModel.get_vision_position_ids`
    (time_interval 1, as for images)."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = np.meshgrid(np.arange(t, dtype=np.int64) + start,
                             np.arange(h, dtype=np.int64) + start,
                             np.arange(w, dtype=np.int64) + start, indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1)


def decode_positions(start: int, length: int, delta: int) -> np.ndarray:
    """(3, length) int64 positions of `length` tokens fed after `start` cached ones: start +
    i + delta in all three streams, as `Qwen2VLModel.compute_3d_position_ids` gives once the
    prompt's rope delta is known."""
    start, length = _int(start, "start", 0), _int(length, "length", 0)
    if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)):
        raise UserError(f"delta={shown(delta)} must be an integer (RopeIndex.delta)")
    row = np.arange(start, start + length, dtype=np.int64) + int(delta)
    return np.ascontiguousarray(np.broadcast_to(row, (3, length)))


def vision_rotary_ids(grids, merge: int) -> np.ndarray:
    """(N, 2) int64 (row, col) of every patch, merge block by merge block and repeated per
    frame: what the vision rotary embedding takes, `transformers.vision_utils.
    get_vision_position_ids` (Qwen2-VL and Qwen2.5-VL alike)."""
    merge = _int(merge, "merge")
    out = []
    for t, h, w in _grids(grids, merge):
        rows, cols = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64),
                                 indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out)


def cu_seqlens(grids) -> np.ndarray:
    """(frames + 1,) int32 cumulative patch counts, one attention segment per frame: the
    vision tower's full attention, `transformers.vision_utils.get_vision_cu_seqlens`."""
    rows = _grids(grids, 1)
    lengths = np.repeat([h * w for _, h, w in rows], [t for t, _, _ in rows])
    bounds = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    if bounds[-1] > np.iinfo(np.int32).max:
        raise UserError(f"image grids {shown(grids)} hold {bounds[-1]} patches, more than the "
                        "vision tower's int32 sequence offsets can count")
    return bounds.astype(np.int32)


def window_index(grids, window_size: int, patch_size: int, merge: int) -> WindowIndex:
    """Qwen2.5-VL's window order of merged tokens and its cumulative window lengths (repeated
    boundaries of empty windows dropped): `transformers.vision_utils.get_vision_window_index`,
    as `Qwen2_5_VisionTransformerPretrainedModel.forward` calls it."""
    merge = _int(merge, "merge")
    side = _int(window_size, "window_size") // merge // _int(patch_size, "patch_size")
    if side < 1:
        raise UserError(f"window_size={window_size} is smaller than one merged block "
                        f"(patch_size {patch_size} x merge {merge}); fix the vision config")
    indexes, bounds, offset = [], [0], 0
    for t, h, w in _grids(grids, merge):
        h, w = h // merge, w // merge
        pad_h, pad_w = side - h % side, side - w % side  # a whole empty window when it divides
        padded = np.pad(np.arange(t * h * w, dtype=np.int64).reshape(t, h, w),
                        ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        rows, cols = (h + pad_h) // side, (w + pad_w) // side
        padded = padded.reshape(t, rows, side, cols, side).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, rows * cols, side, side)
        lengths = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        indexes.append(flat[flat != -100] + offset)
        bounds += (np.cumsum(lengths) * merge**2 + bounds[-1]).tolist()
        offset += t * h * w
    bounds = np.asarray(bounds, dtype=np.int32)
    keep = np.concatenate([[True], bounds[1:] != bounds[:-1]])  # torch.unique_consecutive
    return WindowIndex(np.concatenate(indexes), bounds[keep])


def pass_positions(rope: RopeIndex | None, start: int, end: int) -> np.ndarray | None:
    """An M-RoPE decoder's (3, 1, end - start) positions: the prompt's own, then those of
    generated tokens (start + delta); None for a 1-D decoder."""
    if rope is None:
        return None
    if start < rope.positions.shape[1]:
        return rope.positions[:, None, start:end]
    return decode_positions(start, end - start, rope.delta)[:, None]
