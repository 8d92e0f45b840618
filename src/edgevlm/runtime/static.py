"""Running the mobile profile's static graphs: a fixed cache filled by position.

The mobile decoder (contract.mobile_decoder_io) takes K tokens per pass, a cache of C slots, an
additive attention mask and the rotary cos/sin rows of those K positions, and returns the K new
keys and values. This module owns the numpy side of that contract: it pads token ids and
embeddings to whole passes of K, builds each pass's mask (slot s is visible to the token at
position p when s < start of the pass; the pass's own token j when j <= its index), looks the
rotary rows up in the export's table, and writes each pass's new keys and values into the
cache at their positions. It is used by the runtime (edgevlm.runtime.model) and by the
exporter's parity check alike. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgevlm.errors import UserError
from edgevlm.runtime import contract


def check_rope_table(path, context: int, head_dim: int) -> None:
    """The rope table (contract.ROPE_FILE) is a float (2, context, head_dim) .npy whose data is
    all there, read from its header before np.load: an object array would be unpickled (code
    from the file run), a wrong shape or a short file fail deep inside numpy."""
    fix = f"re-export with --profile mobile to rewrite {contract.ROPE_FILE}"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            start, size = f.tell(), f.seek(0, 2)
    except (OSError, ValueError, SyntaxError, TypeError) as e:
        raise UserError(f"{path} is not a .npy array file ({e}); {fix}") from e
    if dtype.kind != "f":
        raise UserError(f"{path} holds a {dtype} array; the rope table must be floating point "
                        f"(an object array is never loaded: it would unpickle code); {fix}")
    if tuple(shape) != (2, context, head_dim):
        raise UserError(f"{path} has shape {tuple(shape)}; the decoder needs (2, {context}, "
                        f"{head_dim}) (cos and sin per position); {fix}")
    if size - start < 2 * context * head_dim * dtype.itemsize:
        raise UserError(f"{path} is truncated ({size} bytes for a {dtype} array of shape "
                        f"{tuple(shape)}); {fix}")


def load_rope_table(path) -> np.ndarray:
    """The rope table, checked by `check_rope_table` first; never unpickles."""
    return np.load(path, allow_pickle=False)


@dataclass
class StaticCache:
    """The C-slot key/value cache of one generation: (1, kv, C, hd) float32 per past name."""

    tensors: dict[str, np.ndarray]
    filled: int = 0  # positions 0..filled-1 hold keys and values


class StaticGraphs:
    """Embedding and decoder passes over the static graphs of a mobile export."""

    def __init__(self, embed_session, decoder_session, rope: np.ndarray, num_layers: int):
        shapes = {i.name: i.shape for i in decoder_session.get_inputs()}
        past = contract.past_names(num_layers)
        fixed = all(isinstance(d, int) for s in shapes.values() for d in s)
        assert fixed, "a mobile decoder has fixed input shapes"
        _, self.step, self.hidden = shapes["inputs_embeds"]
        _, self.kv_heads, self.context, self.head_dim = shapes[past[0]]
        self.embed_step = embed_session.get_inputs()[0].shape[1]
        if rope.shape != (2, self.context, self.head_dim):
            raise UserError(f"{contract.ROPE_FILE} has shape {rope.shape}, the decoder needs "
                            f"(2, {self.context}, {self.head_dim}); re-export")
        self.rope = rope.astype(np.float32)
        self._embed, self._decoder = embed_session, decoder_session
        self._past, self._present = past, contract.present_names(num_layers)

    def new_cache(self) -> StaticCache:
        shape = (1, self.kv_heads, self.context, self.head_dim)
        return StaticCache({n: np.zeros(shape, np.float32) for n in self._past})

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(S,) ids -> (1, S, D) embeddings, in passes of the graph's fixed length."""
        k = self.embed_step
        padded = np.zeros(-(-len(ids) // k) * k, np.int64)
        padded[: len(ids)] = ids
        parts = [self._embed.run(["inputs_embeds"], {"input_ids": padded[None, i: i + k]})[0]
                 for i in range(0, len(padded), k)]
        return np.concatenate(parts, axis=1)[:, : len(ids)]

    def mask(self, start: int) -> np.ndarray:
        """(1, 1, K, C+K): what the K tokens at positions start.. may attend to."""
        k, c = self.step, self.context
        m = np.full((k, c + k), contract.MASK_VALUE, np.float32)
        m[:, :start] = 0.0
        m[:, c:][np.tril_indices(k)] = 0.0
        return m[None, None]

    def decode(self, embeds: np.ndarray, start: int, cache: StaticCache) -> np.ndarray:
        """Run `embeds` (1, S, D) at positions start..start+S-1; returns logits (1, S, V) and
        writes the new keys and values into `cache`."""
        n = embeds.shape[1]
        if start + n > self.context:
            raise UserError(f"{start + n} positions do not fit the mobile export's fixed "
                            f"context of {self.context}; shorten the prompt or the answer, or "
                            "re-export with a larger --max-context")
        assert start == cache.filled, f"pass at {start} but the cache holds {cache.filled}"
        k, out = self.step, []
        for i in range(0, n, k):
            chunk = embeds[:, i: i + k].astype(np.float32)
            real = chunk.shape[1]
            if real < k:  # the last pass of a prompt: pad; pads sit after every real token
                chunk = np.concatenate([chunk, np.zeros((1, k - real, self.hidden),
                                                        np.float32)], axis=1)
            pos = np.minimum(np.arange(start + i, start + i + k), self.context - 1)
            feeds = {"inputs_embeds": chunk, "attention_mask": self.mask(start + i),
                     "rope_cos": self.rope[0, pos][None], "rope_sin": self.rope[1, pos][None],
                     **cache.tensors}
            logits, *presents = self._decoder.run(["logits", *self._present], feeds)
            for past, new in zip(self._past, presents, strict=True):
                cache.tensors[past][:, :, start + i: start + i + real] = new[:, :, :real]
            cache.filled = start + i + real
            out.append(logits[:, :real])
        return np.concatenate(out, axis=1)
