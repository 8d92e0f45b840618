"""Greedy accuracy of checkpoints on one eval set, and whether two of them differ beyond noise.

    nice python -m benchmarks.quant.accuracy_order --data runs/shapes-eval1000/eval.json \
        --out benchmarks/results/X.json --pair Q0:G0 ... NAME=FOLDER ...

Each checkpoint answers every question with `edgevlm eval FOLDER DATA --max-new-tokens 8` (the
settings of benchmarks.smollm2.quant); its answers are kept in --work, so a rerun evaluates only
what is new. For each `--pair A:B` the two are compared question by question: how many only A got
right, how many only B, the paired difference with a 95% interval, and McNemar's exact
two-sided p (the binomial test on the questions where they disagree). A difference whose
interval holds 0 is one this eval set cannot order. Writes {rows, pairs, command}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import harness


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar p: the chance of a split at least this uneven among the
    questions the two answer differently, were each equally likely to be the one right."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(a: dict[str, bool], b: dict[str, bool]) -> dict:
    ids = sorted(set(a) & set(b))
    if len(ids) != len(a) or len(ids) != len(b):
        raise SystemExit("the two evals answered different questions; rerun both on one data file")
    only_a = sum(a[i] and not b[i] for i in ids)
    only_b = sum(b[i] and not a[i] for i in ids)
    n = len(ids)
    diff = (only_a - only_b) / n
    # variance of the mean of per-question differences d_i in {-1, 0, 1}
    var = ((only_a + only_b) / n - diff ** 2) / n
    half = 1.96 * math.sqrt(max(var, 0.0))
    return {"questions": n, "only_a_right": only_a, "only_b_right": only_b,
            "difference_points": round(100 * diff, 2),
            "ci95_points": [round(100 * (diff - half), 2), round(100 * (diff + half), 2)],
            "mcnemar_p": round(mcnemar_p(only_a, only_b), 4)}


def evaluate(folder: Path, data: Path, out: Path, limit: int | None) -> dict:
    cmd = ["edgevlm", "eval", str(folder), str(data), "--max-new-tokens", "8", "--quiet",
           "--json", str(out)] + (["--limit", str(limit)] if limit else [])
    harness.run_step(cmd, skip_if=out)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, work=Path("/tmp/edgevlm_accuracy_order"))
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="results file (.json)")
    p.add_argument("--pair", action="append", default=[], help="A:B, names of two checkpoints")
    p.add_argument("checkpoints", nargs="+", help="NAME=FOLDER")
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    folders = dict(item.split("=", 1) for item in args.checkpoints)
    for pair in args.pair:
        missing = [n for n in pair.split(":") if n not in folders]
        if ":" not in pair or missing:
            raise SystemExit(f"--pair {pair}: give A:B with both names among the checkpoints")
    args.work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.data.parent.name}-{args.limit or 'all'}"
    result = {"data": harness.relative(args.data), "rows": {}, "pairs": {}}
    right = {}
    for name, folder in folders.items():
        ev = evaluate(Path(folder), args.data, args.work / f"{Path(folder).name}.{tag}.json",
                      args.limit)
        right[name] = {x["id"]: bool(x["correct"]) for x in ev["predictions"]}
        result["rows"][name] = {"folder": harness.relative(folder), "accuracy": ev["accuracy"],
                                "correct": ev["correct"], "total": ev["total"],
                                "per_type": ev["per_type"]}
        print(f"{name}: {100 * ev['accuracy']:.1f}% of {ev['total']}", flush=True)
        harness.write(args.out, result, record=record)
    for pair in args.pair:
        a, b = pair.split(":")
        result["pairs"][pair] = paired(right[a], right[b])
        print(pair, result["pairs"][pair], flush=True)
    harness.write(args.out, result, record=record)


if __name__ == "__main__":
    main()
