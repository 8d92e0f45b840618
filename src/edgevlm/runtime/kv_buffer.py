"""Calling a builder decoder: one KV buffer per layer that past and present share.

The builder's decoder (runtime/contract.py, builder_decoder_io) keeps its cache in buffers of
`max_context` positions. Each pass binds every buffer as both `past_key_values.{i}.*` and
`present.{i}.*` (IOBinding, on the provider's device), so GroupQueryAttention writes the new
keys and values in place at positions start..start+S-1 and nothing is copied or reallocated from
step to step; the attention mask of ones, (1, start + S), tells it how many positions are
filled. The binding itself lives with the cache: the buffers and the logits output (one
preallocated (1, 1, V) row) are bound once, and a step rebinds only its two small inputs, so the
Python cost of a step does not grow with the number of layers. The same calling convention
serves the runtime (edgevlm.runtime.model) and the exporter's parity check. An M-RoPE decoder
(Qwen2-VL) also takes position_ids (3, 1, S) int64, the temporal/height/width position of each
token, which the caller passes to `decode`.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from edgevlm.runtime import contract

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
POSITION_IDS = "position_ids"  # M-RoPE decoders: (3, B, S) int64


class KVCache:
    """The KV buffers of one generation (iterate or index for the OrtValues) and the IOBinding
    that holds them as both past and present."""

    def __init__(self, buffers: list, binding: ort.IOBinding, logits: ort.OrtValue):
        self.buffers = buffers
        self.binding = binding
        self.logits = logits  # (1, 1, V) float32 on the CPU, rewritten by every pass

    def __iter__(self):
        return iter(self.buffers)

    def __getitem__(self, i: int) -> ort.OrtValue:
        return self.buffers[i]

    def __len__(self) -> int:
        return len(self.buffers)


class SharedKV:
    """The builder decoder session and the shape of its KV buffers."""

    def __init__(self, session: ort.InferenceSession, num_layers: int, device: str = "cpu"):
        self.session = session
        self.device = device
        self.past = contract.past_names(num_layers)
        self.present = contract.present_names(num_layers)
        inputs = {i.name: i for i in session.get_inputs()}
        first = inputs[self.past[0]]
        self.kv_dtype = _NP_TYPES.get(first.type, np.float32)
        self.embeds_dtype = _NP_TYPES.get(inputs["inputs_embeds"].type, np.float32)
        _, heads, length, head_dim = first.shape
        assert all(isinstance(d, int) for d in (heads, head_dim)), "kv heads and head size fixed"
        self.shape = (1, heads, length, head_dim)  # length: symbolic until the buffer is made
        self.vocab = session.get_outputs()[0].shape[-1]
        self.takes_positions = POSITION_IDS in inputs  # M-RoPE: position_ids (3, B, S)

    def new_cache(self, max_context: int) -> KVCache:
        """Zeroed buffers of `max_context` positions, one per past input, on the device, bound
        as past and present."""
        zeros = np.zeros((1, self.shape[1], max_context, self.shape[3]), self.kv_dtype)
        buffers = [ort.OrtValue.ortvalue_from_numpy(zeros.copy() if self.device == "cpu"
                                                    else zeros, self.device, 0)
                   for _ in self.past]
        binding = self.session.io_binding()
        logits = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, 1, self.vocab), np.float32))
        binding.bind_ortvalue_output("logits", logits)
        for past, present, buffer in zip(self.past, self.present, buffers, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        return KVCache(buffers, binding, logits)

    def decode(self, embeds: np.ndarray, start: int, cache: KVCache,
               positions: np.ndarray | None = None) -> np.ndarray:
        """One pass over `embeds` (1, S, D) at cache slots start..; returns the last position's
        logits (1, 1, V), a copy, and leaves the new entries in `cache`. `positions`: the
        rotary positions (3, 1, S) int64 of an M-RoPE decoder, which needs them (and ignored by
        any other)."""
        binding = cache.binding
        if self.takes_positions:
            binding.bind_cpu_input(POSITION_IDS, self._positions(positions, embeds.shape[1]))
        binding.bind_cpu_input("inputs_embeds", embeds.astype(self.embeds_dtype, copy=False))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + embeds.shape[1]), np.int64))
        self.session.run_with_iobinding(binding)
        return cache.logits.numpy().copy()

    def _positions(self, positions: np.ndarray | None, length: int) -> np.ndarray:
        if positions is None:
            raise ValueError("this decoder has M-RoPE (a position_ids input): pass decode(..., "
                             "positions=) the (3, 1, S) int64 temporal/height/width positions of "
                             "the S tokens")
        positions = np.asarray(positions)
        if positions.shape != (3, 1, length):
            raise ValueError(f"position_ids must have shape (3, 1, {length}) for {length} "
                             f"tokens, not {positions.shape}")
        return positions.astype(np.int64, copy=False)
