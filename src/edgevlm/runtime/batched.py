"""Continuous batching on a builder decoder: the decode steps of concurrent generations run as
one decoder pass over a batch KV buffer, each generation owning one row of it.

    vlm = BatchedVLM.from_vlm(VLM.load("export"), rows=4)   # then call it from up to 4 threads

The builder graph (runtime/contract.py, builder_decoder_io) takes KV buffers (B, kv, L, hd) and
an attention mask (B, T) whose row sums give GroupQueryAttention its seqlens_k per row
(export/builder/attention.py). With one token per row (S = 1), onnxruntime's GQA reads each
row's position from its own seqlens_k: it writes the row's new key and value at seqlens_k[b],
rotates by that position and attends to positions 0..seqlens_k[b]. So rows at different
lengths share one pass when the mask is right-padded: row b is ones over its start_b + 1
positions and zeros after, T the longest row's.

    prompt of generation r ── batch 1, in chunks, into its own (1, kv, P, hd) buffers, beside
                              the batched passes; then copied into row r (positions 0..P-1)
    buffers[layer] (N, kv, L, hd) numpy; rows [:B] viewed as one OrtValue ── one pass per
                              step for every row below B

Rows below B that are not stepping (free, a generation still in its prefill, or one between two
steps) ride along with a mask of their filled length + 1: the pass writes garbage at the
position that row writes next, which its own next pass (or its prompt's copy) overwrites before
anything reads it. The copy and the batched passes take turns (one lock); prefills run beside
them, as side-by-side generations do (measured: benchmarks/serve/batching.py).

Each generation keeps its own loop (VLM._steps: sampling, stop strings, detokenization), so its
tokens are the ones it gets alone; only its decoder passes go through the Batcher. The stepper
thread runs a pass once every row that stepped last time has sent its next token, or after half
a pass's time: a row that is busy elsewhere (its last token) does not hold the others. The
buffers are numpy arrays shared with onnxruntime, so this runs on the CPU provider; other
providers, and M-RoPE decoders (position_ids per row), keep side-by-side generations
(edgevlm.serve picks).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from edgevlm.runtime.kv_buffer import SharedKV
from edgevlm.runtime.limits import check_kv_memory, kv_bytes
from edgevlm.runtime.model import VLM

MAX_WAIT_S = 0.02  # the longest a pass waits for a row that stepped last time


class BatchKV:
    """The batch KV buffers of `rows` generations and the IOBindings that run them: one per batch
    size B (rows [:B] in one pass), each made once, and a prompt's own (scratch)."""

    def __init__(self, kv: SharedKV, rows: int, context: int):
        heads, head_dim = kv.shape[1], kv.shape[3]
        self.kv, self.rows, self.context = kv, rows, context
        self.buffers = [np.zeros((rows, heads, context, head_dim), kv.kv_dtype) for _ in kv.past]
        self.logits = np.zeros((rows, 1, kv.vocab), np.float32)  # (N, 1, V)
        self._bindings: dict[int, tuple[ort.IOBinding, list]] = {}

    def _binding(self, rows: int) -> ort.IOBinding:
        """rows [:rows] bound as past, present and logits (views: nothing is copied)."""
        if rows not in self._bindings:
            binding = self.kv.session.io_binding()
            views = [ort.OrtValue.ortvalue_from_numpy(self.logits[:rows])]
            binding.bind_ortvalue_output("logits", views[0])
            for past, present, buffer in zip(self.kv.past, self.kv.present, self.buffers,
                                             strict=True):
                view = ort.OrtValue.ortvalue_from_numpy(buffer[:rows])
                binding.bind_ortvalue_input(past, view)
                binding.bind_ortvalue_output(present, view)
                views.append(view)
            self._bindings[rows] = (binding, views)  # the views keep the OrtValues alive
        return self._bindings[rows][0]

    def scratch(self, positions: int) -> _Scratch:
        """KV buffers of `positions` positions for one prompt's prefill, apart from the batch."""
        heads, head_dim = self.kv.shape[1], self.kv.shape[3]
        arrays = [np.zeros((1, heads, positions, head_dim), self.kv.kv_dtype)
                  for _ in self.kv.past]
        logits = np.zeros((1, 1, self.kv.vocab), np.float32)
        binding = self.kv.session.io_binding()
        views = [ort.OrtValue.ortvalue_from_numpy(logits)]
        binding.bind_ortvalue_output("logits", views[0])
        for past, present, array in zip(self.kv.past, self.kv.present, arrays, strict=True):
            views.append(ort.OrtValue.ortvalue_from_numpy(array))
            binding.bind_ortvalue_input(past, views[-1])
            binding.bind_ortvalue_output(present, views[-1])
        return _Scratch(binding, arrays, logits, views)

    def prefill_apart(self, scratch: _Scratch, embeds: np.ndarray, start: int) -> np.ndarray:
        """A prompt chunk (1, S, D) at positions start.. into `scratch`; the last logits (V,)."""
        binding = scratch.binding
        binding.bind_cpu_input("inputs_embeds", embeds.astype(self.kv.embeds_dtype, copy=False))
        binding.bind_cpu_input("attention_mask", np.ones((1, start + embeds.shape[1]), np.int64))
        self.kv.session.run_with_iobinding(binding)
        return scratch.logits[0, 0].copy()

    def commit(self, row: int, scratch: _Scratch) -> None:
        """The prompt's keys and values into row `row` (positions 0..len-1)."""
        for buffer, array in zip(self.buffers, scratch.arrays, strict=True):
            buffer[row, :, :array.shape[2]] = array[0]

    def step(self, embeds: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """One pass over rows [:B]: `embeds` (B, 1, D), one token per row, row b's at position
        lengths[b] - 1; the logits (B, V), a copy."""
        rows = len(lengths)
        binding = self._binding(rows)
        mask = (np.arange(lengths.max()) < lengths[:, None]).astype(np.int64)  # (B, T)
        binding.bind_cpu_input("inputs_embeds", embeds.astype(self.kv.embeds_dtype, copy=False))
        binding.bind_cpu_input("attention_mask", mask)
        self.kv.session.run_with_iobinding(binding)
        return self.logits[:rows, 0].copy()


@dataclass
class _Scratch:
    """One prompt's own KV buffers (1, kv, P, hd) and the binding that fills them."""

    binding: ort.IOBinding
    arrays: list
    logits: np.ndarray  # (1, 1, V)
    views: list  # the OrtValues over the arrays, kept alive with the binding


@dataclass
class _Step:
    """One row's token waiting for a pass, and where its logits go."""

    embeds: np.ndarray  # (1, 1, D)
    start: int
    done: threading.Event = field(default_factory=threading.Event)
    logits: np.ndarray | None = None
    error: BaseException | None = None


class Batcher:
    """Rows handed to generations, and the stepper thread that runs their steps together."""

    def __init__(self, kv: BatchKV):
        self.kv = kv
        self.passes = 0  # batched passes run, and the rows they carried (stats)
        self.rows_stepped = 0
        self._free = list(range(kv.rows))
        self._filled = np.zeros(kv.rows, np.int64)  # positions each row holds
        self._prompt = np.zeros(kv.rows, np.int64)  # each row's prompt length
        self._scratch: dict[int, _Scratch] = {}
        self._pending: dict[int, _Step] = {}
        self._expected: set[int] = set()  # rows that stepped and will step again
        self._cond = threading.Condition()
        self._buffers = threading.Lock()  # prompt copies and batched passes take turns
        self._pass_s = 0.0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgevlm-batch", daemon=True)
        self._thread.start()

    def acquire(self, prompt: int) -> int:
        """A free row for a generation whose prompt is `prompt` tokens (waits for one while
        all are in use)."""
        with self._cond:
            self._cond.wait_for(lambda: self._free or self._stop)
            if self._stop:
                raise RuntimeError("the batcher is closed")
            row = self._free.pop(0)
            self._prompt[row] = prompt
            return row

    def release(self, row: int) -> None:
        """The row's generation is over (finished, failed or cancelled): free it at once."""
        with self._cond:
            self._expected.discard(row)
            self._filled[row] = 0
            self._scratch.pop(row, None)
            self._free.append(row)
            self._free.sort()  # lowest rows first keeps the batch prefix short
            self._cond.notify_all()

    def decode(self, row: int, embeds: np.ndarray, start: int) -> np.ndarray:
        """Row `row`'s pass over `embeds` (1, S, D) at positions start..; the last logits (V,).
        One token waits for the next batched pass; a prompt chunk runs alone."""
        if start < self._prompt[row]:
            return self._prefill(row, embeds, start)
        step = _Step(embeds, start)
        with self._cond:
            if self._stop:
                raise RuntimeError("the batcher is closed")
            self._pending[row] = step
            self._expected.add(row)
            self._cond.notify_all()
        step.done.wait()
        if step.error is not None:
            raise step.error
        return step.logits

    def _prefill(self, row: int, embeds: np.ndarray, start: int) -> np.ndarray:
        """A prompt chunk into the row's own scratch buffers, beside the batched passes; after
        the last chunk the prompt's keys and values go into the row."""
        if start == 0:
            self._scratch[row] = self.kv.scratch(int(self._prompt[row]))
        scratch = self._scratch[row]
        logits = self.kv.prefill_apart(scratch, embeds, start)
        if start + embeds.shape[1] >= self._prompt[row]:
            with self._buffers:
                self.kv.commit(row, scratch)
                self._filled[row] = self._prompt[row]
            del self._scratch[row]
        return logits

    def close(self) -> None:
        """Stop the stepper; a step still waiting raises instead of hanging."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
        for step in self._pending.values():
            step.error = RuntimeError("the batcher was closed before this step ran")
            step.done.set()

    def _take(self) -> dict[int, _Step] | None:
        """The steps of the next pass: once some are waiting, every expected row's, or those
        that came within half a pass (MAX_WAIT_S at most). None once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._stop)
            if self._stop:
                return None
            deadline = time.perf_counter() + min(MAX_WAIT_S, 0.5 * self._pass_s)
            while not self._expected <= self._pending.keys():
                left = deadline - time.perf_counter()
                if left <= 0 or not self._cond.wait(left):
                    break
            steps, self._pending = self._pending, {}
            return steps

    def _run(self) -> None:
        while (steps := self._take()) is not None:
            rows = max(steps) + 1
            embeds = np.zeros((rows, 1, steps[max(steps)].embeds.shape[-1]), np.float32)
            for row, step in steps.items():
                embeds[row] = step.embeds[0]
            t = time.perf_counter()
            try:
                with self._buffers:  # a prompt copied between reading _filled and the pass
                    # would have its next position overwritten
                    lengths = np.minimum(self._filled[:rows], self.kv.context - 1) + 1
                    for row, step in steps.items():
                        lengths[row] = step.start + 1
                    logits = self.kv.step(embeds, lengths)
                    for row, step in steps.items():
                        self._filled[row] = step.start + 1
            except Exception as e:  # noqa: BLE001  each waiting generation raises it
                for step in steps.values():
                    step.error = e
                    step.done.set()
                continue
            self._pass_s = time.perf_counter() - t
            self.passes += 1
            self.rows_stepped += len(steps)
            for row, step in steps.items():
                step.logits = logits[row]
                step.done.set()


class BatchedVLM(VLM):
    """A VLM whose generations (up to `rows` at once, one per thread) share batched decoder
    passes; each call answers exactly as the VLM it was made from (greedy: token for token)."""

    @classmethod
    def supports(cls, vlm: VLM) -> str | None:
        """None when `vlm` can batch; else why not."""
        if vlm.info.decoder != "builder" or vlm.info.profile == "mobile":
            return f"its decoder is {vlm.info.decoder} (batching needs a builder decoder)"
        if "position_ids" in {i.name for i in vlm._decoder.get_inputs()}:
            return "its decoder takes position_ids (M-RoPE), one row's positions per pass"
        if vlm.provider != "cpu":
            return f"it runs on {vlm.provider} (batching keeps its KV buffers in CPU memory)"
        return None

    @classmethod
    def from_vlm(cls, vlm: VLM, rows: int) -> BatchedVLM:
        """`vlm`'s sessions, tokenizer and image cache, with a batch KV buffer of `rows` rows
        (rows x one generation's KV memory, and as much again at most for prompts prefilling in
        buffers of their own length, checked against the machine's)."""
        why = cls.supports(vlm)
        assert why is None, f"cannot batch this export: {why}"
        info = vlm.info
        kv = SharedKV(vlm._decoder, info.num_layers, "cpu")
        # the batch buffer, and the prompts' own buffers while they prefill (one per row at most)
        check_kv_memory(2 * rows * kv_bytes(info.num_layers, info.num_kv_heads, info.head_dim,
                                            info.context, np.dtype(kv.kv_dtype).itemsize),
                        f"{rows} batched generations of {info.context} positions (and their "
                        "prompts' buffers while they prefill)", "lower --parallel")
        new = cls.__new__(cls)
        new.__dict__.update(vlm.__dict__)  # the same sessions and caches, not copies
        new._batcher = Batcher(BatchKV(kv, rows, info.context))
        new._rows = threading.local()
        return new

    def close(self) -> None:
        """Stop the stepper thread (call it once the generations in flight are done)."""
        self._batcher.close()

    def stats(self) -> tuple[int, int]:
        """(batched passes, rows they carried): rows / passes is the mean batch."""
        return self._batcher.passes, self._batcher.rows_stepped

    def _steps(self, p, cfg) -> Iterator[str]:
        row = self._batcher.acquire(len(p.ids))
        self._rows.row = row  # for _new_cache, called on this thread before the first piece
        try:
            return (yield from super()._steps(p, cfg))
        finally:
            self._batcher.release(row)

    def _new_cache(self) -> int:
        return self._rows.row

    def _decode(self, embeds: np.ndarray, start: int, past: int,
                positions: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        assert positions is None, "an M-RoPE decoder does not batch (supports() says so)"
        return self._batcher.decode(past, embeds, start), past
