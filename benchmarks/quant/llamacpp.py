"""llama.cpp's own quantizers on the same weights and text as benchmarks.smollm2.quant.

    nice python -m benchmarks.quant.llamacpp [--types Q4_0 Q4_K_M Q3_K_M] [--limit 300]

Needs the llama.cpp binaries (`llama-quantize`, `llama-perplexity`;
docs/results/quant-ranking.md) under
--llamacpp and its `convert_hf_to_gguf.py` one folder above them, plus `pip install gguf
sentencepiece` (the converter imports sentencepiece even for a BPE tokenizer).

Steps, each a tool a llama.cpp user runs:
1. The language model of --model (the trained SmolLM2 LLaVA) is saved as a plain
   LlamaForCausalLM folder and converted to an F32 GGUF with `convert_hf_to_gguf.py`.
2. `llama-quantize F32 OUT TYPE` for each type. Its log says which tensors fell back to another
   type: SmolLM2's 576-wide rows are not a multiple of the 256-wide K-quant super-block, so in
   the K types most tensors fall back (Q4_K_M: q5_0 and q8_0). The results record every
   tensor's type and the bits per weight of the decoder layers, so each row can be set beside
   ours at its real size.
3. The GGUF is read back with transformers (`from_pretrained(gguf_file=...)`, which
   dequantizes with gguf-py and undoes the converter's Q/K permutation), its weights replace
   the LM's in a copy of --model, and `edgevlm eval` scores that folder exactly as
   benchmarks.smollm2.quant scores ours: greedy accuracy on the first --limit questions of
   runs/shapes/eval.json, perplexity on the first 8192 tokens of runs/pydoc.txt (windows of 512).
4. As a cross-check, `llama-perplexity -c 512` on the text of those 8192 tokens, for the F32
   GGUF and each type (llama.cpp scores the second half of each window, so only its ratio to
   F32 is comparable with ours).

Writes benchmarks/results/llamacpp_quant.json (a rerun keeps the rows already there).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import ROOT

LLAMACPP = Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin")
# bits per weight of each ggml block type (block bytes * 8 / block weights)
BPW = {"f32": 32.0, "f16": 16.0, "q8_0": 8.5, "q6_K": 6.5625, "q5_0": 5.5, "q5_1": 6.0,
       "q5_K": 5.5, "q4_0": 4.5, "q4_1": 5.0, "q4_K": 4.5, "q3_K": 3.4375, "q2_K": 2.625}


def extract_lm(model: Path, out: Path) -> None:
    """The LLaVA's language model and LM head as a LlamaForCausalLM folder, with the tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM, LlavaForConditionalGeneration

    vlm = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    lm = LlamaForCausalLM(vlm.config.text_config)
    state = {f"model.{k}": v for k, v in vlm.model.language_model.state_dict().items()}
    state["lm_head.weight"] = vlm.lm_head.weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)


def tensor_types(log: str) -> dict[str, str]:
    """Tensor name -> ggml type, from llama-quantize's per-tensor lines."""
    types = {}
    for m in re.finditer(r"\]\s+(\S+)\s+- \[.*?type =\s+(\w+)(?:, converting to (\w+))?", log):
        types[m.group(1)] = m.group(3) or m.group(2)
    return types


def decoder_bpw(types: dict[str, str], gguf_path: Path) -> float:
    """Bits per weight over the decoder layers' 2-D weights (what our checkpoints quantize)."""
    from gguf import GGUFReader

    total = bits = 0
    for t in GGUFReader(gguf_path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2 and t.name.endswith(".weight"):
            n = int(t.n_elements)
            total += n
            bits += n * BPW[types[t.name]]
    return bits / total


def graft(model: Path, gguf_dir: Path, gguf_file: str, out: Path) -> None:
    """A copy of the LLaVA folder whose LM weights are the GGUF's, dequantized to float."""
    import shutil

    import torch
    from transformers import LlamaForCausalLM, LlavaForConditionalGeneration

    lm = LlamaForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    vlm = LlavaForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    state = {k.removeprefix("model."): v for k, v in lm.state_dict().items()
             if k.startswith("model.")}
    vlm.model.language_model.load_state_dict(state, strict=True)
    # SmolLM2 ties its output to the embeddings, and so does the GGUF (no output.weight): the
    # LLaVA's lm_head stays tied to the grafted (quantized) embedding table
    assert vlm.config.tie_word_embeddings and lm.lm_head.weight.data_ptr() == \
        lm.model.embed_tokens.weight.data_ptr()
    if out.exists():
        shutil.rmtree(out)
    vlm.save_pretrained(out)
    for f in model.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)


def main(argv: list[str] | None = None) -> None:
    p = harness.parser(__doc__, out=harness.RESULTS / "llamacpp_quant.json",
                       work=Path("/tmp/edgevlm_llamacpp_quant"))
    p.add_argument("--model", type=Path, default=ROOT / "runs" / "smollm2-llava")
    p.add_argument("--data", type=Path, default=ROOT / "runs" / "shapes")
    p.add_argument("--text", type=Path, default=ROOT / "runs" / "pydoc.txt")
    p.add_argument("--llamacpp", type=Path, default=LLAMACPP)
    p.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q3_K_M"])
    p.add_argument("--limit", type=int, default=300)
    args = p.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    args.work.mkdir(parents=True, exist_ok=True)
    results = harness.load(args.out, {"rows": {}})

    def save():
        harness.write(args.out, results, record=record)

    lm_dir, f32 = args.work / "lm-hf", args.work / "lm-F32.gguf"
    if not f32.exists():
        extract_lm(args.model, lm_dir)
        harness.run_step([sys.executable, str(args.llamacpp.parents[1] / "convert_hf_to_gguf.py"),
                          str(lm_dir), "--outtype", "f32", "--outfile", str(f32)], capture=True)

    # the text llama-perplexity reads: the 8192 tokens edgevlm eval scores
    from transformers import AutoTokenizer

    from edgevlm.perplexity import read_text

    tok = AutoTokenizer.from_pretrained(args.model)
    ids = tok(read_text(args.text), add_special_tokens=False)["input_ids"][:8192]
    text_file = args.work / "text8192.txt"
    text_file.write_text(tok.decode(ids))

    def llama_ppl(gguf: Path) -> float:
        r = harness.run_step([args.llamacpp / "llama-perplexity", "-m", gguf, "-f", text_file,
                              "-c", "512", "-t", "2"], capture=True)
        return float(re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr).group(1))

    if "F32" not in results["rows"]:
        results["rows"]["F32"] = {"llama_perplexity": llama_ppl(f32)}
        save()
    for qtype in args.types:
        if qtype in results["rows"]:
            continue
        gguf = args.work / f"lm-{qtype}.gguf"
        r = harness.run_step([args.llamacpp / "llama-quantize", f32, gguf, qtype], capture=True)
        seconds = r.seconds
        log = r.stdout + r.stderr
        types = tensor_types(log)
        counts: dict[str, int] = {}
        for name, t in types.items():
            if name.startswith("blk."):
                kind = name.split(".")[2]
                counts[f"{kind}:{t}"] = counts.get(f"{kind}:{t}", 0) + 1
        folder = args.work / f"vlm-{qtype}"
        graft(args.model, args.work, gguf.name, folder)
        eval_json = args.work / f"vlm-{qtype}.eval.json"
        harness.run_step(["edgevlm", "eval", folder, args.data / "eval.json", "--limit",
                          args.limit, "--max-new-tokens", "8", "--quiet", "--json", eval_json,
                          "--text", args.text, "--max-tokens", "8192"])
        results["rows"][qtype] = {
            "quantize_seconds": seconds,
            "fallbacks": len(re.findall(r"falling back to", log)),
            "decoder_tensor_types": counts,
            "output_type": types.get("token_embd.weight") or types.get("output.weight"),
            "decoder_bpw": decoder_bpw(types, gguf),
            "file_mib": gguf.stat().st_size / 2**20,
            "llama_perplexity": llama_ppl(gguf),
            "folder": str(folder),
            "eval": harness.load(eval_json),
        }
        save()


if __name__ == "__main__":
    main()
