"""One system of benchmarks.runtime.speed, measured in its own fresh process.

    python -m benchmarks.runtime.speed_worker '<spec JSON>'

Prints one line "@@result {...}": decode tokens/s and prefill ms on the spec's text-only prompt
ids, TTFT with the spec's image (ours and transformers), the process's baseline and peak
resident memory (Linux VmRSS / VmHWM: the peak of this process only, not of the parent that
started it), the tokens generated, and for ours where a decode step's time goes. Medians over
`repeats` runs after one warm-up run. speed.py has the setting and the write-up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from edgevlm.bench.harness import BenchConfig, peak_rss, rss_now
from edgevlm.data import Sample


def _median(values):
    values = sorted(values)
    return values[len(values) // 2]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def profile_graph(path, feeds: dict, threads: int, runs: int = 5) -> dict:
    """onnxruntime's own profile of `runs` runs of one graph: kernel ms per run by op type
    (the top 6), the LM head's share, and how many nodes execute."""
    import tempfile
    from collections import Counter

    import onnxruntime as ort

    from edgevlm.runtime.session import options

    opts = options(threads)
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(2 + runs):  # the first two warm up; all are in the profile
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    n = 2 + runs
    by_op = Counter()
    for e in kernels:
        by_op[e["args"]["op_name"]] += e["dur"] / n / 1e3
    return {"kernel_ms": sum(by_op.values()), "nodes_run": len({e["name"] for e in kernels}),
            "lm_head_ms": sum(e["dur"] for e in kernels if "lm_head" in e["name"]) / n / 1e3,
            "by_op_ms": dict(by_op.most_common(6))}


def _decoder_feeds(session, first: dict, kv_heads: int, head_dim: int, past: int) -> dict:
    """Plain session.run feeds at `past` cached positions. A built decoder (no position_ids
    input) then takes a past of that length and returns a longer present, one copy of the cache
    the runtime's shared buffers avoid; the profile includes it."""
    import numpy as np

    rng = np.random.default_rng(0)
    names = {i.name for i in session.get_inputs()}
    first = {k: v for k, v in first.items() if k in names}
    seq = next(iter(first.values())).shape[1]
    feeds = {**first, "attention_mask": np.ones((1, past + seq), np.int64)}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = rng.random((1, kv_heads, past, head_dim), np.float32)
    return feeds


def _ttft_with_image(target, spec: dict) -> tuple[float, int]:
    """Median TTFT (ms) of a 1-token answer about the image, preprocessing included, and the
    prompt's token count (image tokens included)."""
    sample = Sample("speed", Path(spec["image"]), ((spec["question"], ""),), "speed")
    runs = [target.answer(sample, 1) for _ in range(spec["repeats"] + 1)][1:]
    return _median([r.ttft_s for r in runs]) * 1e3, runs[0].n_prompt_tokens


def run_transformers(spec: dict) -> dict:
    import torch

    from edgevlm.bench.torch_target import TokenClock, TorchTarget

    baseline = rss_now()
    target = TorchTarget(Path(spec["model"]), BenchConfig(provider="cpu",
                                                          threads=spec["threads"]))
    model = target.loaded.model
    model.set_attn_implementation("eager")
    lm = model.model.language_model
    weights = sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                  if "embed_tokens" not in n) + model.lm_head.weight.nbytes
    ids = torch.tensor([spec["ids"]])
    prefill, decode, tokens = [], [], []
    for i in range(spec["repeats"] + 1):  # the first run warms up
        clock = TokenClock()
        with torch.inference_mode():
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=spec["new_tokens"],
                                 min_new_tokens=spec["new_tokens"], do_sample=False,
                                 streamer=clock)
        new = clock.times[1:]  # the first put is the prompt
        if i:
            prefill.append(new[0] - t)
            decode.append((len(new) - 1) / (new[-1] - new[0]))
            tokens = out[0, ids.shape[1]:].tolist()
    return {"decode_tokens_per_s": _median(decode), "prefill_ms": _median(prefill) * 1e3,
            "ttft_image_ms": _ttft_with_image(target, spec)[0], "new_tokens": len(tokens),
            "tokens": tokens, "weight_bytes_per_token": weights, "baseline_rss": baseline,
            "peak_rss": peak_rss()}


def run_ours(spec: dict) -> dict:
    import numpy as np

    from edgevlm.bench.harness import ExportTarget
    from edgevlm.runtime.preprocess import preprocess
    from edgevlm.runtime.session import open_session, resolve

    baseline = rss_now()
    cfg = BenchConfig(provider="cpu", threads=spec["threads"], precision=spec["precision"])
    target = ExportTarget(Path(spec["export"]), cfg)
    vlm = target.vlm
    prefill, decode = [], []
    for i in range(spec["repeats"] + 1):
        r = vlm.generate(None, spec["text"], max_new_tokens=spec["new_tokens"],
                         min_new_tokens=spec["new_tokens"])
        assert r.timings.n_prompt_tokens == len(spec["ids"]), r.timings.n_prompt_tokens
        if i:
            prefill.append(r.timings.ttft_s - r.timings.preprocess_s)
            decode.append(r.timings.decode_tokens_per_s)
    ttft, n_image_prompt = _ttft_with_image(target, spec)
    result = {"decode_tokens_per_s": _median(decode), "prefill_ms": _median(prefill) * 1e3,
              "ttft_image_ms": ttft, "n_image_prompt": n_image_prompt,
              "new_tokens": r.timings.n_new_tokens, "tokens": list(r.token_ids),
              "baseline_rss": baseline, "peak_rss": peak_rss()}  # before the probes below
    # Where a decode step's time goes: the decoder graph alone (plain session.run, numpy past
    # at the mean decode position) and the embedding graph, against the runtime's whole step;
    # then onnxruntime's profile of that step and of the prefill of the image prompt.
    info, provider = vlm.info, resolve("cpu")
    dec, _ = open_session(info.graphs["decoder_model_merged"], provider, spec["threads"])
    emb, _ = open_session(info.graphs["embed_tokens"], provider, spec["threads"])
    past = len(spec["ids"]) + spec["new_tokens"] // 2
    token = {"input_ids": np.array([[5]], np.int64)}
    step = _decoder_feeds(dec, {"inputs_embeds": emb.run(None, token)[0],  # (1, 1, D)
                                "position_ids": np.array([[past]], np.int64)},
                          info.num_kv_heads, info.head_dim, past)
    run = lambda: dec.run(None, step)  # noqa: E731
    if info.decoder == "builder":  # the runtime's call: KV buffers bound as past and present
        from edgevlm.runtime.kv_buffer import SharedKV

        kv = SharedKV(dec, info.num_layers)
        cache = kv.new_cache(info.context)
        run = lambda: kv.decode(step["inputs_embeds"], past, cache)  # noqa: E731
    for _ in range(3):
        run()
    graph = _median([_timed(run) for _ in range(20)])
    embed = _median([_timed(lambda: emb.run(None, token)) for _ in range(20)])
    n_image_prompt = result.pop("n_image_prompt")
    prefill = _decoder_feeds(dec, {"inputs_embeds": np.repeat(step["inputs_embeds"],
                                                              n_image_prompt, axis=1),
                                   "position_ids": np.arange(n_image_prompt)[None]},
                             info.num_kv_heads, info.head_dim, 0)
    return {**result, "step_ms": 1e3 / result["decode_tokens_per_s"],
            "decoder_graph_step_ms": graph * 1e3, "embed_graph_step_ms": embed * 1e3,
            "profile_step": profile_graph(info.graphs["decoder_model_merged"], step,
                                          spec["threads"], 10),
            "profile_image_prefill": {"tokens": n_image_prompt, **profile_graph(
                info.graphs["decoder_model_merged"], prefill, spec["threads"], 2)},
            "profile_vision": profile_graph(info.graphs["vision_encoder"], {
                "pixel_values": preprocess(spec["image"], info.image_processor)},
                spec["threads"], 3)}


def run_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    baseline = rss_now()
    model = og.Model(spec["genai"])
    prefill, decode, tokens = [], [], []
    for i in range(spec["repeats"] + 1):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(spec["ids"]) + spec["new_tokens"],
                                  min_length=len(spec["ids"]) + spec["new_tokens"],
                                  do_sample=False)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(spec["ids"])  # the prefill
        stamps, new = [], []
        while not gen.is_done():
            gen.generate_next_token()
            new.append(int(gen.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        if i:
            prefill.append(stamps[0] - t)
            decode.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
            tokens = new
    result = {"decode_tokens_per_s": _median(decode), "prefill_ms": _median(prefill) * 1e3,
              "ttft_image_ms": None, "new_tokens": len(tokens), "tokens": tokens,
              "baseline_rss": baseline, "peak_rss": peak_rss(), "version": og.__version__}
    import numpy as np
    import onnxruntime as ort

    cfg = json.loads((Path(spec["genai"]) / "genai_config.json").read_text())["model"]["decoder"]
    graph = Path(spec["genai"]) / cfg["filename"]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    past = len(spec["ids"]) + spec["new_tokens"] // 2
    step = _decoder_feeds(session, {"input_ids": np.array([[5]], np.int64)},
                          cfg["num_key_value_heads"], cfg["head_size"], past)
    del session
    return {**result, "profile_step": profile_graph(graph, step, spec["threads"], 10)}


if __name__ == "__main__":
    from benchmarks import harness

    p = harness.parser(__doc__)
    p.add_argument("spec", help="the system to measure, as JSON (speed.py writes it)")
    spec = json.loads(p.parse_args().spec)
    run = {"transformers": run_transformers, "ours": run_ours, "genai": run_genai}[spec["kind"]]
    print("@@result " + json.dumps(run(spec)), flush=True)
