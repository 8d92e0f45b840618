"""The tables of benchmarks.runtime.speed: its results as markdown, and the issue's targets
met or missed with their numbers."""

from __future__ import annotations

import statistics

PROMPT_TOKENS, NEW_TOKENS = 64, 32


def _f(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _range(r: dict) -> str:
    d = (r.get("rounds") or {}).get("decode_tokens_per_s") or []
    return f" ({min(d):.0f}–{max(d):.0f})" if len(d) > 1 else ""


def _paired(a: dict, b: dict) -> str:
    """The decode ratio a/b within each round (the two ran minutes apart at most), as text."""
    x = (a.get("rounds") or {}).get("decode_tokens_per_s") or []
    y = (b.get("rounds") or {}).get("decode_tokens_per_s") or []
    if len(x) < 2 or len(x) != len(y):
        return ""
    r = sorted(u / v for u, v in zip(x, y))
    return f"; per round {', '.join(f'{v:.2f}' for v in r)}, median {statistics.median(r):.2f}x"


def targets(rows: dict) -> list[str]:
    """The issue's targets for ours int4, each met or missed with the numbers."""
    ours, ref = rows["ours int4"], rows["transformers fp32 (eager)"]
    genai = rows["onnxruntime-genai int4 (text only)"]
    if "error" in ours or "error" in ref:
        return ["Targets: not evaluated (a system failed; see the table)."]

    def line(ok: bool, what: str) -> str:
        return f"- {'MET' if ok else 'MISSED'}: {what}"

    d, p = ours["decode_tokens_per_s"], ours["prefill_ms"]
    out = ["Targets (ours int4):"]
    int8 = rows.get("ours int8", {})
    if "error" not in int8:
        q = int8["prefill_ms"]
        out.append(line(p <= q, f"prefill of {PROMPT_TOKENS} tokens ≤ ours int8: {p:.1f} vs "
                                f"{q:.1f} ms; TTFT with image {ours['ttft_image_ms']:.1f} vs "
                                f"{int8['ttft_image_ms']:.1f} ms"))
    if "error" in genai:
        out.append("- NOT MEASURED: decode ≥ onnxruntime-genai int4 (genai failed)")
    else:
        g, gp = genai["decode_tokens_per_s"], genai["prefill_ms"]
        out.append(line(d >= g, f"decode ≥ onnxruntime-genai int4: {d:.1f} vs {g:.1f} tok/s "
                                f"({d / g:.2f}x){_paired(ours, genai)}"))
        out.append(line(p <= gp, f"prefill of {PROMPT_TOKENS} tokens ≤ onnxruntime-genai's: "
                                 f"{p:.1f} vs {gp:.1f} ms ({p / gp:.2f}x)"))
    q4 = rows.get("llama.cpp Q4_0 (text only)")
    if q4 is None or "error" in q4:
        out.append("- NOT MEASURED (goal): decode ≥ llama.cpp Q4_0")
    else:
        q, qp = q4["decode_tokens_per_s"], q4["prefill_ms"]
        out.append(line(d >= q, f"(goal) decode ≥ llama.cpp Q4_0: {d:.1f} vs {q:.1f} tok/s "
                                f"({d / q:.2f}x){_paired(ours, q4)}; prefill {p:.1f} vs "
                                f"{qp:.1f} ms ({p / qp:.2f}x)"))
    out += [line(ours["x_decode"] >= 3, f"decode ≥ 3x transformers: {ours['x_decode']:.2f}x"),
            line(ours["x_ttft_image"] <= 0.5, f"TTFT with image ≤ 0.5x transformers: "
                 f"{ours['ttft_image_ms']:.1f} vs {ref['ttft_image_ms']:.1f} ms "
                 f"({ours['x_ttft_image']:.2f}x)"),
            line(ours["x_peak_rss"] <= 0.5, f"peak RSS ≤ 0.5x transformers: "
                 f"{ours['peak_rss'] / 1e6:.0f} vs {ref['peak_rss'] / 1e6:.0f} MB "
                 f"({ours['x_peak_rss']:.2f}x)")]
    return out


def markdown(results: dict) -> str:
    bw = results["bandwidth_bytes_per_s"]
    out = ["# Runtime speed", "", f"`{results['command']}` — {results['machine']['cpu']}, "
           f"{results['threads']} threads, bandwidth {bw['1'] / 1e9:.1f} GB/s (1 thread) / "
           f"{bw[str(results['threads'])] / 1e9:.1f} GB/s ({results['threads']} threads). "
           f"smollm2: the real weights, the others random; {PROMPT_TOKENS}-token text "
           f"prompt, exactly {NEW_TOKENS} new greedy tokens; each figure the median of "
           f"{results.get('rounds', 1)} interleaved rounds (decode: the rounds' range in "
           f"brackets), each round the median of {results['repeats']} runs; "
           "TTFT with image includes preprocessing and the vision encoder. × = ratio to "
           "transformers (decode: higher is better; the others: lower is better).", ""]
    for name, m in results["models"].items():
        out += [f"## {name}", "", "| system | decode tok/s | × | prefill ms | × | TTFT image ms "
                "| × | peak RSS MB | × | weights MB/token | bound tok/s | % of bound "
                "| new tokens |", "|" + "---|" * 13]
        for label, r in m["systems"].items():
            if "error" in r:
                out.append(f"| {label} | error: {r['error'][-300:].splitlines()[-1]} |")
                continue
            out.append(
                f"| {label} | {r['decode_tokens_per_s']:.1f}{_range(r)} "
                f"| {_f(r.get('x_decode'), '.2f')} "
                f"| {r['prefill_ms']:.1f} | {_f(r.get('x_prefill'), '.2f')} "
                f"| {_f(r['ttft_image_ms'], '.1f')} | {_f(r.get('x_ttft_image'), '.2f')} "
                f"| {r['peak_rss'] / 1e6:.0f} | {_f(r.get('x_peak_rss'), '.2f')} "
                f"| {r['weight_bytes_per_token'] / 1e6:.1f} | {r['bound_tokens_per_s']:.0f} "
                f"| {100 * r['fraction_of_bound']:.0f}% | {r['new_tokens']} |")
        out += [""] + targets(m["systems"]) + ["", "Decode step, ours: the whole step against "
                                                 "the decoder graph alone (plain session.run) "
                                                 "and the embedding graph:", ""]
        for label, r in m["systems"].items():
            if "graph_nodes" in r and "decoder_graph_step_ms" in r:
                other = r["step_ms"] - r["decoder_graph_step_ms"] - r["embed_graph_step_ms"]
                out.append(f"- {label}: step {r['step_ms']:.2f} ms = decoder graph "
                           f"{r['decoder_graph_step_ms']:.2f} + embed "
                           f"{r['embed_graph_step_ms']:.2f} + other {other:.2f} ms; "
                           f"{r['graph_nodes']} nodes in the decoder graph")
            elif r.get("graph_nodes"):
                out.append(f"- {label}: {r['graph_nodes']} nodes in its graph")
        out += ["", "onnxruntime profile (kernel time with profiling on, per run; nodes after "
                "onnxruntime's graph optimizations):", ""]
        for label, r in m["systems"].items():
            if "profile_step" not in r:
                continue
            p = r["profile_step"]
            mm = sum(v for k, v in p["by_op_ms"].items() if k.startswith(("MatMul", "Dynamic")))
            out.append(f"- {label}, decode step: {p['kernel_ms']:.2f} ms in {p['nodes_run']} "
                       f"nodes, of which MatMul-type {mm:.2f} ms; top ops "
                       + ", ".join(f"{k} {v:.2f}" for k, v in p["by_op_ms"].items()))
            if "profile_image_prefill" in r:
                q, v = r["profile_image_prefill"], r["profile_vision"]
                out.append(f"  image prefill ({q['tokens']} tokens): {q['kernel_ms']:.1f} ms, "
                           f"LM head over every position {q['lm_head_ms']:.1f} ms; vision "
                           f"encoder {v['kernel_ms']:.1f} ms; top ops "
                           + ", ".join(f"{k} {x:.1f}" for k, x in q["by_op_ms"].items()))
        out.append("")
    return "\n".join(out)
