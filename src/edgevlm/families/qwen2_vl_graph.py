"""The Qwen2-VL / Qwen2.5-VL vision encoder as the exporter traces it: one image per call,
`pixel_values` (N patches, C·T·P·P) and the grid (1, 3) in (`grid_thw` for Qwen2-VL,
`image_grid_thw` for Qwen2.5-VL: runtime.contract.PATCH_GRID_INPUTS), `image_features`
(N / merge², D_text) out, for any image size.

transformers' tower splits attention by `cu_seqlens` with Python lists and builds its rotary
positions with Python loops over the grid, which a tracer would bake in for one image size. Here
the same computation is written with tensor ops on the grid: the 2-D rotary positions from
`arange(h)`, `arange(w)` in the merge order (2 x 2 neighbours adjacent), and the tower's own
rotary module, norms, qkv / proj and MLP; attention is over the whole image (one image, so
cu_seqlens is [0, N]). Qwen2.5-VL's window layers take `window_index` (the merged tokens in
window order) and `cu_window_seqlens` from the runtime (edgevlm.runtime.mrope) and attend within
each window; its `fullatt_block_indexes` layers attend over the whole image, as the model does.
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_positions(grid: torch.Tensor, merge: int) -> torch.Tensor:
    """(N, 2) (row, column) of each patch, patches in the processor's order: merge x merge
    blocks, row by row, each block's patches row by row; repeated for each frame."""
    t, h, w = grid[0, 0], grid[0, 1], grid[0, 2]
    rows = torch.arange(h).unsqueeze(1).expand(-1, w)
    cols = torch.arange(w).unsqueeze(0).expand(h, -1)

    def blocks(x):
        return x.reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3).flatten()

    ids = torch.stack([blocks(rows), blocks(cols)], dim=-1)  # (h·w, 2)
    return ids.repeat(t, 1)


def _attend(block, x: torch.Tensor, cos, sin, bias) -> torch.Tensor:
    """One tower block's attention over x (1, N, D) with rotary (cos, sin) and an additive
    (N, N) bias (None: every patch sees every patch)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

    attn = block.attn
    n = x.shape[1]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (heads, N, hd)
    scores = torch.matmul(q, k.transpose(1, 2)) * attn.scaling
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).transpose(0, 1).reshape(1, n, -1)
    return attn.proj(out)


class PatchVisionEncoder(nn.Module):
    """pixel_values (N, C·T·P·P), grid (1, 3) [, window_index, cu_window_seqlens]
    -> image_features (N / merge², D_text); equals the model's get_image_features."""

    def __init__(self, model):
        super().__init__()
        self.tower = model.model.visual
        self.merge = self.tower.spatial_merge_size
        self.full = set(getattr(self.tower, "fullatt_block_indexes", None) or
                        range(len(self.tower.blocks)))
        self.windowed = len(self.full) < len(self.tower.blocks)

    def _window_bias(self, n: int, window_index, cu_window_seqlens, dtype):
        """(N, N): 0 within a window, the dtype's minimum across windows."""
        pos = torch.arange(n)
        window = (pos.unsqueeze(1) >= cu_window_seqlens[1:].unsqueeze(0)).sum(1)
        same = window.unsqueeze(1) == window.unsqueeze(0)
        return torch.where(same, 0.0, torch.finfo(dtype).min).to(dtype)

    def _permute(self, x, window_index):
        unit = self.merge ** 2
        n = x.shape[0]
        return x.reshape(n // unit, unit, -1)[window_index].reshape(n, -1)

    def example_inputs(self) -> tuple:
        """Tracing inputs: a 4 x 6 grid (the sizes are dynamic axes of the graph)."""
        from transformers.vision_utils import get_vision_window_index

        tower = self.tower
        grid = torch.tensor([[1, 4, 6]])
        dim = tower.patch_embed.in_channels * tower.patch_embed.temporal_patch_size * \
            tower.patch_embed.patch_size ** 2
        args = (torch.randn(24, dim), grid)
        if not self.windowed:
            return args
        index, cu = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                            window_size=tower.window_size,
                                            patch_size=tower.patch_size)
        return (*args, index, torch.as_tensor(cu, dtype=torch.int64))

    def feeds(self, pixel_values, grid) -> tuple:
        """The graph's numpy inputs for one image, in its input order (the caller names them by
        runtime.contract.vision_io): its patches (N, C·T·P·P) and grid (1, 3), and for a
        windowed tower the window order and bounds (as transformers computes them)."""
        from transformers.vision_utils import get_vision_window_index

        out = (pixel_values.float().numpy(), grid.numpy())
        if not self.windowed:
            return out
        index, cu = get_vision_window_index(grid, spatial_merge_size=self.merge,
                                            window_size=self.tower.window_size,
                                            patch_size=self.tower.patch_size)
        return (*out, index.numpy().astype("int64"), torch.as_tensor(cu).numpy().astype("int64"))

    def forward(self, pixel_values, image_grid_thw, window_index=None, cu_window_seqlens=None):
        tower = self.tower
        dtype = next(tower.parameters()).dtype
        x = tower.patch_embed(pixel_values.to(dtype))
        cos, sin = tower.rotary_pos_emb(x, rotary_positions(image_grid_thw, self.merge))
        window_bias = None
        if self.windowed:
            x = self._permute(x, window_index)
            cos, sin = self._permute(cos, window_index), self._permute(sin, window_index)
            window_bias = self._window_bias(x.shape[0], window_index, cu_window_seqlens, dtype)
        x = x.unsqueeze(0)  # (1, N, D): Linears on 3-D inputs trace to MatMul, which the
        # int8 quantizer and the checkpoint's integers take (2-D ones become Gemm)
        for i, block in enumerate(tower.blocks):
            bias = None if i in self.full else window_bias
            x = x + _attend(block, block.norm1(x), cos, sin, bias)
            x = x + block.mlp(block.norm2(x))
        merger = tower.merger
        feats = merger.mlp(merger.ln_q(x).reshape(1, -1, merger.hidden_size))[0]
        if self.windowed:
            feats = feats[torch.argsort(window_index)]
        return feats.float()
