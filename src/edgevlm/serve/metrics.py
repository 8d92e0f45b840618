"""Prometheus text exposition (format 0.0.4) of what the server did: requests by route and
status, prompt and completion tokens, requests generating and waiting, and histograms of time
to first token (queue wait included: what a client sees) and of seconds per decoded token.
Written by hand, a few dozen lines, rather than adding prometheus_client to the install."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DECODE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.total}', f"{name}_sum {self.sum}",
                      f"{name}_count {self.total}"]


class Metrics:
    """Counters shared by the event loop and the generation threads (hence the lock)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode = Histogram(DECODE_BUCKETS)

    def request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def generation(self, prompt_tokens: int, completion_tokens: int, ttft_s: float,
                   decode_s: float, decode_steps: int) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.ttft.observe(ttft_s)
            if decode_steps > 0:
                self.decode.observe(decode_s / decode_steps)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self, in_flight: int, waiting: int, loaded: bool) -> str:
        with self._lock:
            lines = ["# HELP edgevlm_requests_total HTTP requests by route and status.",
                     "# TYPE edgevlm_requests_total counter"]
            lines += [f'edgevlm_requests_total{{route="{r}",status="{s}"}} {n}'
                      for (r, s), n in sorted(self.requests.items())]
            for name, value, kind, text in (
                    ("prompt_tokens_total", self.prompt_tokens, "counter",
                     "Prompt tokens processed (image tokens included)."),
                    ("completion_tokens_total", self.completion_tokens, "counter",
                     "Tokens generated."),
                    ("cancelled_total", self.cancelled, "counter",
                     "Generations stopped because the client went away."),
                    ("requests_in_flight", in_flight, "gauge", "Requests generating now."),
                    ("queue_depth", waiting, "gauge", "Requests waiting for a slot."),
                    ("model_loaded", int(loaded), "gauge", "1 once the export is loaded.")):
                lines += [f"# HELP edgevlm_{name} {text}", f"# TYPE edgevlm_{name} {kind}",
                          f"edgevlm_{name} {value}"]
            lines += ["# HELP edgevlm_ttft_seconds Request arrival to first token.",
                      "# TYPE edgevlm_ttft_seconds histogram",
                      *self.ttft.lines("edgevlm_ttft_seconds"),
                      "# HELP edgevlm_decode_seconds_per_token Decode time per token.",
                      "# TYPE edgevlm_decode_seconds_per_token histogram",
                      *self.decode.lines("edgevlm_decode_seconds_per_token")]
        return "\n".join(lines) + "\n"
