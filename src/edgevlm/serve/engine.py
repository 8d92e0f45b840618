"""Running requests on the one loaded VLM: `--parallel` generation threads (the runtime keeps
each call's state in locals, so threads share one VLM), a bounded wait for a free one
(`--max-queue`; one more is a 429), and a cancel flag checked after every piece so a client
that goes away frees its thread, and its batch row, within one decoder step.

With a builder decoder on the CPU and --parallel 2 or more, the threads' decode steps run as one
batched decoder pass (edgevlm.runtime.batched: a batch KV buffer of --parallel rows, a row per
request); ServeConfig(batching="off"), or any other export, runs them side by side, each with
its own KV buffer. benchmarks/serve/batching.py measured which is faster (docs/serve.md).

A generation thread reports to the event loop through an asyncio queue of events:
("start", None) once the prompt is prepared (bad input fails before it, so a stream's 200 is
only sent for a request that runs), then ("piece", text)..., then ("done", result) or
("error", exception).
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from edgevlm.errors import UserError
from edgevlm.runtime.batched import BatchedVLM
from edgevlm.serve.api_error import APIError
from edgevlm.serve.metrics import Metrics
from edgevlm.serve.request import ChatRequest


@dataclass
class Run:
    """One admitted request: its events, and the flag that stops its generation."""

    events: asyncio.Queue
    cancel: threading.Event
    t_arrival: float
    queue_s: float = 0.0
    done: asyncio.Future | None = field(default=None, repr=False)

    async def next(self) -> tuple[str, object]:
        return await self.events.get()


class Engine:
    def __init__(self, vlm, parallel: int, max_queue: int, max_prompt_tokens: int | None,
                 metrics: Metrics, batching: str = "auto"):
        self.vlm = batched_vlm(vlm, parallel, batching)
        self.batched = isinstance(self.vlm, BatchedVLM)
        self.parallel = parallel
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self.metrics = metrics
        self.in_flight = 0
        self.waiting = 0
        self._pool = ThreadPoolExecutor(parallel, thread_name_prefix="edgevlm-serve")
        self._slots: asyncio.Semaphore | None = None  # made on the server's event loop

    async def start(self, req: ChatRequest, t_arrival: float,
                    cancel: threading.Event | None = None) -> Run:
        """Wait for a free thread (429 when --max-queue are already waiting) and start; setting
        `cancel` (or the returned run's) stops the generation after its next piece."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.parallel)
        if self._slots.locked() and self.waiting >= self.max_queue:
            raise APIError(429, f"{self.in_flight} requests are generating and {self.waiting} "
                           f"waiting, the most --max-queue allows; retry later", None,
                           "queue_full")
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.in_flight += 1
        loop = asyncio.get_running_loop()
        run = Run(asyncio.Queue(), cancel or threading.Event(), t_arrival,
                  time.perf_counter() - t_arrival)

        def put(event: tuple[str, object]) -> None:
            loop.call_soon_threadsafe(run.events.put_nowait, event)

        run.done = loop.run_in_executor(self._pool, self._generate, req, run, put)
        run.done.add_done_callback(self._release)
        return run

    def _release(self, _future) -> None:
        self.in_flight -= 1
        self._slots.release()

    def close(self) -> None:
        """Wait for the generations in flight, then end the threads."""
        self._pool.shutdown(wait=True)
        if self.batched:
            self.vlm.close()

    def count_prompt_tokens(self, req: ChatRequest) -> int:
        """The prompt's tokens as the runtime will count them: the rendered template's, with
        the image tag standing for the export's image tokens."""
        vlm = self.vlm
        text = vlm.template.render(vlm.messages(req.image, req.messages),
                                   add_generation_prompt=True)
        n = len(vlm.tokenizer.encode(text))
        return n - 1 + vlm.info.num_image_tokens if req.image is not None else n

    def _generate(self, req: ChatRequest, run: Run, put) -> None:
        """The generation thread's whole work for one request."""
        try:
            if self.max_prompt_tokens is not None:
                n = self.count_prompt_tokens(req)
                if n > self.max_prompt_tokens:
                    raise APIError(400, f"the prompt is {n} tokens, over --max-prompt-tokens "
                                   f"{self.max_prompt_tokens}; shorten it", "messages",
                                   "context_length_exceeded")
            stream = self.vlm.stream(req.image, req.messages,
                                     max_new_tokens=req.max_new_tokens or self.vlm.info.max_tokens,
                                     temperature=req.temperature, top_p=req.top_p,
                                     seed=req.seed, stop=req.stop)
        except Exception as e:  # noqa: BLE001  UserError/APIError: a 4xx; anything else is
            put(("error", e))  # this request's 500, and serving goes on
            return
        put(("start", None))
        pieces = iter(stream)
        try:
            for piece in pieces:
                put(("piece", piece))
                if run.cancel.is_set():
                    break
        except Exception as e:  # noqa: BLE001  as above
            put(("error", e))
            return
        finally:
            pieces.close()
        result = stream.result
        if result is None:  # stopped: the client went away
            self.metrics.cancel()
        else:
            t = result.timings
            self.metrics.generation(t.n_prompt_tokens, t.n_new_tokens, run.queue_s + t.ttft_s,
                                    t.decode_s, max(t.n_new_tokens - 1, 0))
        put(("done", result))


def batched_vlm(vlm, parallel: int, batching: str):
    """The VLM the engine runs: batched decode steps (`batching` "on", or "auto" with --parallel
    2 or more) where the export allows it, else `vlm` itself, side by side."""
    if batching == "off" or (batching == "auto" and parallel < 2):
        return vlm
    why = BatchedVLM.supports(vlm)
    if why is None:
        return BatchedVLM.from_vlm(vlm, parallel)  # checks --parallel x KV memory
    if batching == "on":
        raise UserError(f"--batching on, but this export cannot batch: {why}; use --batching "
                        "auto or off")
    return vlm
