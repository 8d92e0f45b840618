"""The decoder back-ends `VLM`'s generation loop drives: one interface, three kinds of graph.

The loop (edgevlm.runtime.model) embeds the prompt, passes it through the decoder from an empty
cache in chunks, then passes one token per step; only how the cache is held differs:

- `TracedDecoder`: the default graph traced from transformers (contract.decoder_io). Past in,
  present out; the presents, kept as OrtValues on the provider's device through IOBinding, are
  the next pass's past, so on a GPU they never leave the device.
- `BuilderDecoder`: a builder graph (contract.builder_decoder_io). KV buffers of the export's
  max_context positions are bound as both past and present and written in place
  (edgevlm.runtime.kv_buffer).
- `StaticDecoder`: the mobile profile's static graphs (contract.mobile_decoder_io). A fixed cache
  filled by position, in passes of the graph's fixed length (edgevlm.runtime.static).

`open_decoder` picks one from the ExportInfo, once, when the VLM opens. A back-end keeps no
state of its own between calls: each generation's cache is the caller's, so one back-end serves
several threads.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from edgevlm.runtime import contract
from edgevlm.runtime.contract import DecoderKind, Profile
from edgevlm.runtime.kv_buffer import KVCache, SharedKV
from edgevlm.runtime.manifest import ExportInfo
from edgevlm.runtime.static import StaticCache, StaticGraphs, load_rope_table

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

Cache = Any  # each back-end's own: a list of OrtValues, a kv_buffer.KVCache, a static.StaticCache

_SHORTEN = "shorten the prompt or re-export with a larger --max-context"


class Decoder(Protocol):
    """What the generation loop needs of a decoder back-end."""

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """(S,) int64 token ids -> (1, S, D) embeddings."""

    def new_cache(self) -> Cache:
        """The empty cache a generation starts from (position 0)."""

    def decode(self, embeds: np.ndarray, start: int, cache: Cache,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, Cache]:
        """One pass over `embeds` (1, S, D) at positions start..start+S-1, which follow what
        `cache` holds; returns the last position's logits (V,), the caller's own to change, and
        the cache to hand to the next pass. `positions`: an M-RoPE decoder's (3, 1, S) rotary
        positions (None: start..start+S-1)."""

    def limit_reason(self, limit: int) -> str:
        """Why `limit` positions are all a prompt and its answer get, and what would give more."""


def _embed(session: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    return session.run(["inputs_embeds"], {"input_ids": ids[None]})[0]  # (1, S, D)


class TracedDecoder:
    """A traced decoder: every pass takes the past and returns the presents, on the device."""

    def __init__(self, embed: ort.InferenceSession, decoder: ort.InferenceSession,
                 info: ExportInfo, device: str):
        self._embed, self._decoder, self._device = embed, decoder, device
        self._past = contract.past_names(info.num_layers)
        self._present = contract.present_names(info.num_layers)
        types = {i.name: _NP_TYPES.get(i.type, np.float32) for i in decoder.get_inputs()}
        self._embeds_dtype = types["inputs_embeds"]
        self._past_shape = (1, info.num_kv_heads, 0, info.head_dim)
        self._past_dtype = types[self._past[0]]

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return _embed(self._embed, ids)

    def new_cache(self) -> list[ort.OrtValue]:
        empty = np.zeros(self._past_shape, dtype=self._past_dtype)
        return [ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0) for _ in self._past]

    def decode(self, embeds: np.ndarray, start: int, cache: list[ort.OrtValue],
               positions: np.ndarray | None = None) -> tuple[np.ndarray, list[ort.OrtValue]]:
        seq = embeds.shape[1]
        binding = self._decoder.io_binding()
        binding.bind_cpu_input("inputs_embeds", embeds.astype(self._embeds_dtype, copy=False))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + seq), dtype=np.int64))
        if positions is None:
            positions = np.arange(start, start + seq, dtype=np.int64)[None]
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, np.int64))
        for name, value in zip(self._past, cache, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present:
            binding.bind_output(name, self._device)
        self._decoder.run_with_iobinding(binding)
        outputs = binding.get_outputs()  # in bind order: logits, then presents
        assert len(outputs) == 1 + len(self._present), "one output per bound name"
        logits = outputs[0].numpy()  # (1, S, V)
        return logits[0, -1].astype(np.float32), list(outputs[1:])

    def limit_reason(self, limit: int) -> str:
        return f"the model's limit is {limit} (max_position_embeddings); shorten the prompt"


class BuilderDecoder:
    """A builder decoder: KV buffers of `context` positions that every pass writes in place."""

    def __init__(self, embed: ort.InferenceSession, kv: SharedKV, context: int):
        self._embed, self._kv, self._context = embed, kv, context

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return _embed(self._embed, ids)

    def new_cache(self) -> KVCache:
        return self._kv.new_cache(self._context)

    def decode(self, embeds: np.ndarray, start: int, cache: KVCache,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, KVCache]:
        logits = self._kv.decode(embeds, start, cache, positions=positions)
        return logits[0, -1].astype(np.float32), cache

    def limit_reason(self, limit: int) -> str:
        return f"the export's KV buffer holds {limit} positions (decoder.max_context); {_SHORTEN}"


class StaticDecoder:
    """A mobile export's static graphs: a fixed cache the passes fill by position."""

    def __init__(self, graphs: StaticGraphs):
        self._graphs = graphs

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self._graphs.embed(ids)

    def new_cache(self) -> StaticCache:
        return self._graphs.new_cache()

    def decode(self, embeds: np.ndarray, start: int, cache: StaticCache,
               positions: np.ndarray | None = None) -> tuple[np.ndarray, StaticCache]:
        assert positions is None, "mobile graphs take 1-D positions only"
        return self._graphs.decode(embeds, start, cache)[0, -1], cache

    def limit_reason(self, limit: int) -> str:
        return f"the mobile export's fixed context is {limit} (static_shapes.context); {_SHORTEN}"


def open_decoder(info: ExportInfo, embed: ort.InferenceSession, decoder: ort.InferenceSession,
                 device: str) -> Decoder:
    """The back-end for an export's decoder graph (`device`: the provider's, for OrtValues)."""
    if info.profile == Profile.MOBILE:
        return StaticDecoder(StaticGraphs(embed, decoder, load_rope_table(info.rope_file),
                                          info.num_layers))
    if info.decoder == DecoderKind.BUILDER:
        return BuilderDecoder(embed, SharedKV(decoder, info.num_layers, device), info.context)
    return TracedDecoder(embed, decoder, info, device)
