"""Which layers are worth more bits: a quantized checkpoint's perplexity with chosen Linears put
back at 8 (or 6) bits, before spending a quantize run on a --layer-bits recipe.

    nice python -m benchmarks.quant.layer_bits_probe CHECKPOINT [--model runs/smollm2-llava] \
        [--text runs/pydoc.txt] [--out benchmarks/results/layer_bits_probe.json]

Loads the float model and CHECKPOINT (as edgevlm eval does), then for each recipe replaces the
named language-model Linears of the checkpoint by round-to-nearest of their float weights
(symmetric, one absmax scale per output row, 8 or 6 bits) and measures perplexity on the first
8,192 tokens of --text. The other layers keep the checkpoint's integers, searched while those
layers were at 4 bits, so a real --layer-bits run (which searches around the 8-bit layers) can
only do as well or better; this ranks recipes, it does not replace the run. "Q4_K_M layers" is
llama.cpp's use_more_bits: the first and last eighth of the layers and every third between.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import harness
from benchmarks.harness import ROOT


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS / "layer_bits_probe.json")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--text", type=Path, default=ROOT / "runs" / "pydoc.txt")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    import torch

    from edgevlm.models import load_model
    from edgevlm.perplexity import perplexity
    from edgevlm.quant.act import load_for_eval

    text = args.text.read_text()
    fp = load_model(args.model)
    q = load_for_eval(args.checkpoint)
    float_w = {n: m.weight.detach().clone() for n, m in fp.model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    mods = {n: m for n, m in q.model.named_modules()
            if isinstance(m, torch.nn.Linear) and "language_model" in n}
    held = {n: m.weight.detach().clone() for n, m in mods.items()}
    n_layers = q.model.config.text_config.num_hidden_layers

    def rtn(w, bits):
        top = (1 << (bits - 1)) - 1
        s = w.abs().amax(1, keepdim=True) / top
        return (w / s).round().clamp(-top - 1, top) * s

    def layer(name):
        return int(name.split("layers.")[1].split(".")[0])

    def more_bits(i):  # llama.cpp llama-quant.cpp use_more_bits
        return i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2

    recipes = {
        "as quantized": ((), 8, None),
        "v_proj 8": (("v_proj",), 8, None),
        "v_proj 6": (("v_proj",), 6, None),
        "k_proj + v_proj 8": (("k_proj", "v_proj"), 8, None),
        "q_proj + k_proj + v_proj 8": (("q_proj", "k_proj", "v_proj"), 8, None),
        "down_proj 8": (("down_proj",), 8, None),
        "v_proj + down_proj 8": (("v_proj", "down_proj"), 8, None),
        "v_proj + down_proj 8, Q4_K_M layers": (("v_proj", "down_proj"), 8, more_bits),
    }
    out = {"checkpoint": harness.relative(args.checkpoint), "rows": {}}
    base = perplexity(fp, text, quiet=True).perplexity
    out["fp_perplexity"] = base
    for label, (ends, bits, where) in recipes.items():
        for name, m in mods.items():
            chosen = name.rsplit(".", 1)[-1] in ends and (where is None or where(layer(name)))
            m.weight.data = (rtn(float_w[name].float(), bits).to(m.weight.dtype) if chosen
                             else held[name].clone())
        ppl = perplexity(q, text, quiet=True).perplexity
        out["rows"][label] = {"perplexity": ppl, "rise": ppl / base - 1}
        print(f"{label}: {ppl:.3f} ({100 * (ppl / base - 1):+.1f}%)", flush=True)
        harness.write(args.out, out, record=record)


if __name__ == "__main__":
    main()
