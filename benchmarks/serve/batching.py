"""Continuous batching against side-by-side generations (issue 36, item 3): `--parallel N`
requests in flight on one export, their decode steps either run as N decoder passes side by side
(a thread each, each with its own KV buffer: `VLM`) or as one batched pass over a shared batch
KV buffer (`edgevlm.runtime.batched.BatchedVLM`).

    python -m benchmarks.serve.batching [--export DIR] [--concurrency 1 2 4 8] [--requests 8]
        [--new-tokens 32] [--repeats 3] [--threads N] [--work DIR] [--quick --out DIR]

Per export and concurrency c: `--requests` text-only chat requests (every prompt different),
c at a time on c threads as the server's engine runs them, greedy, exactly `--new-tokens` new
tokens each (end of sequence held off, so both ways do the same work). Side by side and batched
take turns, `--repeats` rounds each, the order swapped every round, after one untimed warm-up
round: the machine's other load falls on both alike, and the table gives the median round.
Figures: aggregate decode tokens per second (new tokens of the level over its wall time, prefill
included, as a server sees it), p50 and p95 request latency (call to last token), p50 time to
first token, this process's CPU time per new token (user + system: what each way costs
whatever else the machine runs), the mean rows per batched pass, and whether every request's
tokens equal between the two ways (they must: greedy, token for token).

Exports: `tiny` is the tiny-teacher preset with RANDOM weights exported fp32 here (a builder
decoder, 2 layers: Python's cost per step dominates); `--export DIR` adds your own, say the
SmolLM2 LLaVA int4 export (`edgevlm init smol --preset llava-smollm2 --text-from "$(python -m
benchmarks.smollm2 locate)"; edgevlm export smol --out DIR --precision int4`). Writes
serve_batching.json and .md into --out (default benchmarks/results; --quick: the tiny export,
concurrency 1 and 2, one round, into the work folder).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import harness

MODES = ("side_by_side", "batched")
TOPICS = ("a lighthouse", "the river", "a small robot", "winter", "the market", "a violin",
          "the desert", "an old map", "the harbor", "a garden")


def prompts(n: int, offset: int) -> list[str]:
    """`n` different short questions (offset: a round's own)."""
    return [f"Request {offset + i}: write two sentences about {TOPICS[(offset + i) % 10]} and "
            f"the number {7 * (offset + i) + 3}." for i in range(n)]


def one_level(vlm, texts: list[str], concurrency: int, new_tokens: int) -> dict:
    """`texts` on `concurrency` threads; the round's figures and every request's tokens."""
    def call(text):
        return vlm.generate(None, text, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    t0, cpu0 = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as ex:
        results = list(ex.map(call, texts))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    latency = sorted(r.timings.total_s for r in results)
    tokens = sum(r.timings.n_new_tokens for r in results)
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "cpu_ms_per_token": 1e3 * cpu / tokens,
            "latency_p50_s": _pct(latency, 0.5), "latency_p95_s": _pct(latency, 0.95),
            "ttft_p50_s": statistics.median(r.timings.ttft_s for r in results),
            "token_ids": [list(r.token_ids) for r in results]}


def _pct(xs: list[float], q: float) -> float:
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def measure(name: str, export_dir: Path, args) -> dict:
    """Both ways at every concurrency, rounds interleaved; medians and ratios."""
    from edgevlm.runtime import VLM
    from edgevlm.runtime.batched import BatchedVLM

    plain = VLM.load(export_dir, provider="cpu", threads=args.threads)
    why = BatchedVLM.supports(plain)
    assert why is None, f"{export_dir} cannot batch: {why}"
    levels = []
    for c in args.concurrency:
        n = max(c, args.requests)
        batched = BatchedVLM.from_vlm(plain, c)
        ways = {"side_by_side": plain, "batched": batched}
        rounds = {m: [] for m in MODES}
        for r in range(args.repeats + 1):  # round 0 warms up and is not kept
            order = MODES if r % 2 else MODES[::-1]
            for mode in order:
                got = one_level(ways[mode], prompts(n, 1000 * c + 100 * r), c, args.new_tokens)
                if r:
                    rounds[mode].append(got)
        passes, rows = batched.stats()
        batched.close()
        levels.append(_summary(c, n, rounds, rows / max(passes, 1)))
        print(f"{name} c={c}: " + ", ".join(
            f"{m} {levels[-1][m]['tokens_per_s']:.1f} tok/s" for m in MODES) +
            f", batched/side {levels[-1]['ratio_tokens_per_s']:.2f}x", flush=True)
    return {"export": harness.relative(str(export_dir)), "levels": levels}


def _summary(c: int, n: int, rounds: dict, mean_batch: float) -> dict:
    """The median round of each way (by tokens per second), and batched / side by side."""
    out = {"concurrency": c, "requests": n, "rounds": len(rounds["batched"]),
           "mean_rows_per_pass": mean_batch,
           "identical_tokens": all(a["token_ids"] == b["token_ids"]
                                   for a, b in zip(rounds["side_by_side"], rounds["batched"],
                                                   strict=True))}
    for mode in MODES:
        runs = sorted(rounds[mode], key=lambda x: x["tokens_per_s"])
        med = runs[len(runs) // 2]
        out[mode] = {k: v for k, v in med.items() if k != "token_ids"}
        out[mode]["tokens_per_s_all"] = [x["tokens_per_s"] for x in rounds[mode]]
    for key in ("tokens_per_s", "latency_p50_s", "ttft_p50_s", "cpu_ms_per_token"):
        out[f"ratio_{key}"] = out["batched"][key] / out["side_by_side"][key]
    return out


def table(results: dict) -> str:
    rows = ["| export | concurrency | side by side tok/s | batched tok/s | batched / side | "
            "latency p50 ms side / batched | TTFT p50 ms side / batched | CPU ms per token "
            "side / batched | rows per pass | same tokens |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        for lv in r["levels"]:
            s, b = lv["side_by_side"], lv["batched"]
            rows.append(f"| {name} | {lv['concurrency']} | {s['tokens_per_s']:.1f} | "
                        f"{b['tokens_per_s']:.1f} | {lv['ratio_tokens_per_s']:.2f}x | "
                        f"{1e3 * s['latency_p50_s']:.0f} / {1e3 * b['latency_p50_s']:.0f} | "
                        f"{1e3 * s['ttft_p50_s']:.0f} / {1e3 * b['ttft_p50_s']:.0f} | "
                        f"{s['cpu_ms_per_token']:.1f} / {b['cpu_ms_per_token']:.1f} | "
                        f"{lv['mean_rows_per_pass']:.2f} | "
                        f"{'yes' if lv['identical_tokens'] else 'NO'} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    from benchmarks.runtime.image_cache import build_tiny

    p = harness.parser(__doc__, out=None, work=None,
                       quick="the tiny export, concurrency 1 and 2, one round")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads (default: onnxruntime's, one per core)")
    p.add_argument("--export", type=Path, action="append", default=[],
                   help="an export to measure besides the tiny one (repeatable)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests", type=int, default=8, help="requests per round (at least c)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per way and level")
    args = p.parse_args(argv)
    record = harness.Record.start("benchmarks.serve.batching", argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="edgevlm-batching-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.concurrency, args.repeats, args.export = [1, 2], 1, []
    exports = {"tiny": build_tiny(work), **{e.name: e for e in args.export}}
    load = os.getloadavg()[0]
    results = {name: measure(name, path, args) for name, path in exports.items()}
    data = {"load_average_1min": [load, os.getloadavg()[0]], "new_tokens": args.new_tokens,
            "threads": args.threads, "results": results}
    md = ("# Continuous batching against side-by-side generations\n\n" + table(results) +
          f"\n\n{args.new_tokens} new tokens per request, text only, greedy; medians of "
          f"{args.repeats} interleaved rounds. 1-minute load average before / after: "
          f"{load:.2f} / {os.getloadavg()[0]:.2f}.\n")
    out = harness.out_dir(args, work) / "serve_batching"
    harness.write(out, data, md, record)
    print(md)


if __name__ == "__main__":
    main()
