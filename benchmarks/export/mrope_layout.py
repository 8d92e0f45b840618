"""How a built M-RoPE decoder applies its rotary, timed: prefill of 300 tokens and 64 decode
steps on the CPU (2 threads), SmolLM2-135M's sizes (hidden 576, 30 layers, 9 heads over 3 KV
heads, head_dim 64) as a Qwen2-VL text decoder with random weights, fp32.

Layouts (edgevlm.export.builder.mrope): "gqa" (merged cos/sin rows fed to GroupQueryAttention's
own rotary), "rotary" (q and k rotated by RotaryEmbedding, GroupQueryAttention do_rotary=0), and,
for reference, "mrotary": the "rotary" graph with each RotaryEmbedding swapped for onnxruntime's
MRotaryEmbedding over the static caches (what onnxruntime-genai's Qwen2.5-VL builder writes),
and the same weights as a plain Qwen2 decoder (ordinary RoPE inside GroupQueryAttention, no
position_ids). Each graph's logits are checked against transformers first.

    python -m benchmarks.export.mrope_layout [--out benchmarks/results/mrope_layout]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from benchmarks import harness
from edgevlm.export.builder.linear import Linears
from edgevlm.export.builder.model import build_decoder
from edgevlm.runtime.contract import Activations
from edgevlm.runtime.kv_buffer import SharedKV

SIZES = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             max_position_embeddings=2048, rms_norm_eps=1e-5)
SECTION = [8, 12, 12]  # Qwen2-VL's [16, 24, 24] scaled to head_dim 64
PREFILL, STEPS, CONTEXT, THREADS, REPEATS = 300, 64, 512, 2, 5


class TextDecoder(nn.Module):
    def __init__(self, text, lm_head, text_config):
        super().__init__()
        self.text, self.lm_head, self.text_config = text, lm_head, text_config


def models():
    """(Qwen2-VL text decoder, Qwen2 decoder with the same weights)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 100000.0}
    config = Qwen2VLConfig(text_config={**SIZES, "rope_parameters": {**rope,
                                                                      "mrope_section": SECTION}})
    text = Qwen2VLTextModel(config.text_config).eval()
    head = nn.Linear(576, SIZES["vocab_size"], bias=False)
    plain = Qwen2ForCausalLM(Qwen2Config(**SIZES, rope_parameters=rope)).eval()
    plain.model.load_state_dict(text.state_dict())
    plain.lm_head.load_state_dict(head.state_dict())
    return (TextDecoder(text, head, config.text_config),
            TextDecoder(plain.model, plain.lm_head, plain.config))


def to_mrotary(path: Path) -> None:
    """The "rotary" graph with MRotaryEmbedding over the static caches in place of each
    RotaryEmbedding."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "RotaryEmbedding":
            node.op_type = "MRotaryEmbedding"
            node.input[1:] = ["position_ids", "cos_cache", "sin_cache"]
            del node.attribute[:]
            heads = SIZES["num_attention_heads"] if "/q_rotary" in node.name else \
                SIZES["num_key_value_heads"]
            node.attribute.extend([onnx.helper.make_attribute("num_heads", heads),
                                   onnx.helper.make_attribute("mrope_section", SECTION),
                                   onnx.helper.make_attribute("interleaved", 0)])
    onnx.save_model(model, str(path))


def positions(n: int) -> np.ndarray:
    """(3, 1, n): 20 text tokens, a 1 x 10 x 14 image grid, then text."""
    t, h, w = np.meshgrid(np.arange(1), np.arange(10), np.arange(14), indexing="ij")
    grid = 20 + np.stack([t.ravel(), h.ravel(), w.ravel()])
    after = np.arange(20 + 14, 20 + 14 + n - 20 - grid.shape[1])
    rows = [np.full((3, 20), np.arange(20)), grid, np.full((3, after.size), after)]
    return np.concatenate(rows, axis=1)[:, None].astype(np.int64)


def session(path: Path) -> SharedKV:
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return SharedKV(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                    SIZES["num_hidden_layers"])


def run(kv: SharedKV, embeds, pos, mrope: bool) -> tuple[float, float, np.ndarray]:
    """(prefill seconds, seconds per decode step, logits (STEPS + 1, V))."""
    cache = kv.new_cache(CONTEXT)
    arg = (lambda a, b: pos[:, :, a:b]) if mrope else (lambda a, b: None)
    t0 = time.perf_counter()
    rows = [kv.decode(embeds[:, :PREFILL], 0, cache, arg(0, PREFILL))[0, 0]]
    t1 = time.perf_counter()
    for i in range(PREFILL, PREFILL + STEPS):
        rows.append(kv.decode(embeds[:, i:i + 1], i, cache, arg(i, i + 1))[0, 0])
    t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / STEPS, np.stack(rows)


def reference(decoder, embeds, pos) -> np.ndarray:
    with torch.no_grad():
        out = decoder.text(inputs_embeds=torch.from_numpy(embeds),
                           position_ids=torch.from_numpy(pos))
        return decoder.lm_head(out.last_hidden_state[0, PREFILL - 1:]).numpy()


def main(argv: list[str] | None = None) -> None:
    args = harness.parser(__doc__, out=harness.RESULTS / "mrope_layout").parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    torch.set_num_threads(THREADS)
    vl, plain = models()
    n = PREFILL + STEPS
    embeds = np.random.default_rng(0).standard_normal((1, n, 576)).astype(np.float32)
    pos = positions(n)
    text_pos = np.broadcast_to(np.arange(n), (3, 1, n)).copy()
    want = reference(vl, embeds, pos)
    want_text = reference(vl, embeds, text_pos)
    linears = Linears(np.dtype(np.float32))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for name, layout, decoder in (("gqa", "gqa", vl), ("rotary", "rotary", vl),
                                      ("mrotary", "rotary", vl), ("plain", "gqa", plain)):
            path = Path(tmp) / name / "decoder.onnx"
            build_decoder(decoder, path, "fp32", CONTEXT, linears, Activations.FP32,
                          mrope_layout=layout)
            if name == "mrotary":
                to_mrotary(path)
            graphs[name] = session(path)
        errors, times = {}, {name: [] for name in graphs}
        for name, kv in graphs.items():  # the check, also a warm-up
            mrope = name != "plain"
            logits = run(kv, embeds, pos if mrope else text_pos, mrope)[2]
            errors[name] = float(np.abs(logits - (want if mrope else want_text)).max())
        for _ in range(REPEATS):  # round robin: a busy spell on the machine hits every layout
            for name, kv in graphs.items():
                times[name].append(run(kv, embeds, pos, name != "plain")[:2])
        for name, t in times.items():
            results[name] = (statistics.median(x[0] for x in t),
                             statistics.median(x[1] for x in t), errors[name])
            print(name, results[name], flush=True)
    harness.write(args.out, {"results": {k: dict(zip(("prefill_s", "decode_step_s", "max_abs"),
                                                      v, strict=True))
                                         for k, v in results.items()}},
                  markdown(results), record)


def markdown(results: dict) -> str:
    base_p, base_d, _ = results["gqa"]
    lines = ["# M-RoPE layouts of the built decoder", "",
             "SmolLM2-135M sizes as a Qwen2-VL text decoder (hidden 576, 30 layers, 9 heads / 3 "
             f"KV heads, head_dim 64, mrope_section {SECTION}), random weights, fp32, CPU "
             f"onnxruntime {ort.__version__}, {THREADS} threads; prefill {PREFILL} tokens (an "
             f"image grid among text), then {STEPS} decode steps; median of {REPEATS} runs, the "
             "layouts in turn. Ratios are to \"gqa\". max-abs: logits vs transformers over "
             "prefill and steps.", "",
             "Command: `python -m benchmarks.export.mrope_layout`", "",
             "| layout | prefill ms | ratio | decode ms/step | ratio | max-abs vs torch |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, (p, d, e) in results.items():
        lines.append(f"| {name} | {p * 1e3:.1f} | {p / base_p:.3f} | {d * 1e3:.2f} | "
                     f"{d / base_d:.3f} | {e:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
