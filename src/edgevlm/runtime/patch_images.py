"""What the runtime does for a family whose images arrive as patches at their own resolution and
whose decoder takes M-RoPE positions (Qwen2-VL, Qwen2.5-VL): pixels and grid from the image
(runtime.patches), the prompt's one image placeholder expanded to the image's token count, the
vision graph's feeds (one image per call; the window order for a windowed tower), and the
decoder's three position streams (runtime.mrope)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.runtime import contract, mrope, patches


@dataclass(frozen=True)
class PatchFamily:
    """An export's patch-family settings (edgevlm.json "vision" and the token ids)."""

    config: patches.PatchConfig
    vision_start_id: int | None  # wrap the image's tokens in these when the template did not
    vision_end_id: int | None
    window_size: int | None = None  # a windowed tower (Qwen2.5-VL); None: full attention

    def pixels(self, image, dtype) -> tuple[np.ndarray, tuple[int, int, int]]:
        out = patches.patchify(image, self.config)
        return out.pixel_values.astype(dtype, copy=False), out.grid

    def tokens(self, grid) -> int:
        return patches.image_tokens(grid, self.config.merge_size)

    def expand(self, ids: list[int], image_token_id: int, grid,
               keep: int | None = None) -> list[int]:
        """`ids` with its one image token replaced by the image's run of them (at most `keep`,
        the export's --visual-tokens), wrapped in <|vision_start|> / <|vision_end|> unless the
        template already put them around it."""
        at = ids.index(image_token_id)
        run = [image_token_id] * min(self.tokens(grid), keep or self.tokens(grid))
        before, after = ids[:at], ids[at + 1:]
        if self.vision_start_id is not None and not (before and before[-1] ==
                                                     self.vision_start_id):
            run = [self.vision_start_id] + run + [self.vision_end_id]
        return before + run + after

    @property
    def kind(self) -> str:
        """The vision graph's patch IO ("full" or "windowed"; runtime.contract.vision_io)."""
        return "full" if self.window_size is None else "windowed"

    def feeds(self, pixel_values: np.ndarray, grid) -> dict:
        out = {"pixel_values": pixel_values,
               contract.PATCH_GRID_INPUTS[self.kind]: np.asarray([grid], np.int64)}
        if self.window_size is not None:
            w = mrope.window_index([grid], self.window_size, self.config.patch_size,
                                   self.config.merge_size)
            out.update(window_index=w.index.astype(np.int64),
                       cu_window_seqlens=w.cu_seqlens.astype(np.int64))
        return out

    def positions(self, ids: np.ndarray, image_token_id: int, grid,
                  kept: np.ndarray | None = None) -> mrope.RopeIndex:
        """The prompt's M-RoPE positions. `kept` (ascending indices into the image's tokens,
        --visual-tokens): `ids` holds only those; each keeps the (t, h, w) position it has in
        the whole image, and the text after the image sits where it would after all of it."""
        if kept is None:
            return mrope.rope_index(ids, image_token_id, [grid] if grid is not None else [],
                                    self.config.merge_size)
        at = int(np.flatnonzero(ids == image_token_id)[0])
        full = np.concatenate([ids[:at], np.full(self.tokens(grid), image_token_id, ids.dtype),
                               ids[at + len(kept):]])
        whole = mrope.rope_index(full, image_token_id, [grid], self.config.merge_size).positions
        columns = np.concatenate([np.arange(at), at + np.asarray(kept),
                                  np.arange(at + self.tokens(grid), len(full))])
        positions = np.ascontiguousarray(whole[:, columns])
        return mrope.RopeIndex(positions, int(positions.max()) + 1 - positions.shape[1])

    def select(self, feats: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(1, N, D) features -> the `keep` DivPrune picks, in image order, and their indices;
        as they are (and None) when the image has no more than `keep` tokens."""
        from edgevlm.runtime.token_select import divprune

        if feats.shape[1] <= keep:
            return feats, None
        kept = divprune(feats[0], keep)
        return feats[:, kept], kept
