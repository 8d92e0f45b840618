"""Why GPTQ calibrated on shapes loses to round-to-nearest on SmolLM2's text perplexity.

    nice python -m benchmarks.quant.gptq_diagnosis --gptq DIR [--samples 16]

For every decoder Linear of the float model (runs/smollm2-llava) this measures the relative
output error ‖(W − Ŵ)X‖ / ‖WX‖ of two quantized weights Ŵ, GPTQ's (the checkpoint DIR, made with
`edgevlm quantize --method gptq --calib runs/shapes/train.json`) and round-to-nearest's (the same
bits, group and symmetry), on two kinds of inputs X: the shapes calibration prompts GPTQ was fitted
on, and real text (512-token windows from the end of runs/pydoc.txt, away from the scored start).
Each layer's inputs come from the float model, so the numbers isolate the layer.

If GPTQ lowers the error on the shapes inputs but raises it on text, its solution fits the
calibration distribution (image tokens and short shapes answers) and not the language the
perplexity measures: the calibration set, not damping, ordering or arithmetic. Writes
benchmarks/results/gptq_diagnosis.json.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from benchmarks import harness
from benchmarks.harness import ROOT


def main(argv: list[str] | None = None) -> None:
    from edgevlm.models import load_model
    from edgevlm.quant import rtn
    from edgevlm.quant.calib_data import calibration_batches
    from edgevlm.quant.calibrate import (
        decoder_layers,
        layer_forward,
        layer_stats,
        linears,
        prepare,
        relative_error,
    )
    from edgevlm.quant.checkpoint import read_int4_layers, read_scheme
    from edgevlm.quant.primitives import QuantConfig

    p = harness.parser(__doc__, out=harness.RESULTS / "gptq_diagnosis.json")
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--gptq", type=Path, required=True)
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "shapes" / "train.json")
    p.add_argument("--text", type=Path, default=ROOT / "runs" / "pydoc.txt")
    p.add_argument("--samples", type=int, default=16)
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    torch.set_num_threads(2)
    scheme = read_scheme(args.gptq)
    cfg = QuantConfig(method="gptq", bits=scheme.num_bits, group_size=scheme.group_size,
                      symmetric=bool(scheme.symmetric), calib_samples=args.samples)
    loaded = load_model(args.model)
    model = loaded.model
    gptq = {}  # module name -> GPTQ's dequantized weight
    for name, (q, s, z, g) in read_int4_layers(args.gptq).items():
        qt, st, zt = (torch.from_numpy(a).float() for a in (q, s, z))
        k = qt.shape[1]
        gptq[name] = (qt - zt.repeat_interleave(g, 1)[:, :k]) * st.repeat_interleave(g, 1)[:, :k]
    sets = {"shapes": calibration_batches(loaded, args.data, cfg, None).batches,
            "text": calibration_batches(loaded, None, cfg, None, args.text).batches}
    rows = {}
    with torch.no_grad():
        calib = {k: prepare(model, b) for k, b in sets.items()}
        xs = {k: c.hidden for k, c in calib.items()}
        for i, layer in enumerate(decoder_layers(model)):
            targets = linears(layer, f"model.language_model.layers.{i}", cfg.skip)
            stats = {k: layer_stats(layer, xs[k], calib[k].layer_kwargs[i], calib[k].masks,
                                    targets, with_entropy=False)[0] for k in sets}
            for name, m in targets.items():
                W = m.weight.detach().float()
                R = rtn.quantize_weight(W, cfg).dequantize()
                rows[name] = {f"{method}_{k}": relative_error(W, Wq, stats[k][name].hessian)
                              for method, Wq in (("gptq", gptq[name]), ("rtn", R))
                              for k in sets}
            xs = {k: layer_forward(layer, xs[k], calib[k].layer_kwargs[i]) for k in sets}
    summary = {}
    for k in sets:
        ratio = [r[f"gptq_{k}"] / r[f"rtn_{k}"] for r in rows.values()]
        summary[k] = {"median_gptq_over_rtn": statistics.median(ratio),
                      "layers_where_gptq_is_lower": sum(x < 1 for x in ratio),
                      "layers": len(ratio)}
    out = {"scheme": scheme.__dict__, "summary": summary, "layers": rows}
    harness.write(args.out, out, record=record)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
