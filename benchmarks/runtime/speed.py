"""Decode rate, prefill, time to first token and peak memory of the edgevlm runtime against
transformers and onnxruntime-genai, side by side on one machine.

Models (--models, comma separated):
  smollm2       the real SmolLM2-135M weights under a SigLIP tower (runs/smollm2-llava0, made by
                `python -m benchmarks.smollm2 make`; --smollm2-dir), 30 layers, vocab 49153,
                196 image tokens
  tiny-teacher  the preset with RANDOM weights (SigLIP 48 px -> 9 image tokens, Qwen2 decoder
                hidden 256, 2 layers)
  llama-150m    a Llama-style decoder with RANDOM weights, vocab 32000, hidden 768, MLP 2048, 12
                layers, 12 heads (4 KV heads), SigLIP tower at 224 px (384 wide, 6 layers, 196
                tokens)
Speed does not depend on the weights' values; no accuracy is claimed here.
Systems, each measured in its own fresh process (so peak RSS is its own):
  transformers  LlavaForConditionalGeneration.generate, fp32, eager attention (the reference)
  ours fp32 / int8 / int4   edgevlm.runtime.VLM on `edgevlm export --precision ...`: the built
                decoder (edgevlm.export.builder; int8/int4 MatMulNBits at accuracy_level 4)
  ours int4 accuracy_level=0   the same with float activations (`--accuracy-level 0`): what int8
                activations buy on this CPU
  ours int4 block 128   `--block-size 128` (the default is 32): fewer scales per weight row
  ours int4 traced   `--decoder traced`, the torch.onnx decoder the builder replaced
  genai on our int4   onnxruntime-genai running our int4 export's genai_config.json
  genai int4    onnxruntime-genai on `python -m onnxruntime_genai.models.builder -i <the text
                decoder saved as a causal LM> -o <dir> -p int4 -e cpu` (text only)
Decode and prefill use the same text-only prompt of exactly 64 token ids and exactly 32 new
greedy tokens for every system (end-of-sequence held off: min_new_tokens / genai's min_length;
llama-bench always generates its -n); TTFT with image is the image + a short question, 1 new token,
preprocessing included (ours and transformers only). `threads` intra-op threads everywhere.
The decode bound is memory bandwidth (numpy copy of a 256 MB array, read + write bytes per
second) / bytes read per token (decoder weights except the embedding table, which is read one
row at a time, plus the fp32 KV cache at the mean decode position).

  nice python -m benchmarks.runtime.speed [--models smollm2,llama-150m] [--work DIR]
      [--threads 2] [--repeats 3] [--rounds 3] [--llama-cpp BIN_DIR]
Writes benchmarks/results/runtime_speed.json and .md (--out).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.runtime import speed_llamacpp as llamacpp
from benchmarks.runtime.speed_report import NEW_TOKENS, PROMPT_TOKENS, markdown

WORKER = "benchmarks.runtime.speed_worker"

WORDS = "is the red circle left of the blue square or above a green triangle".split()
QUESTION = "<image>\nWhat color is the shape in the middle of the picture?"

_VISION = {"model_type": "siglip_vision_model", "hidden_size": 384, "intermediate_size": 1536,
           "num_hidden_layers": 6, "num_attention_heads": 6, "image_size": 224,
           "patch_size": 16}
LLAMA_150M = {
    "vision_config": _VISION,
    "text_config": {"model_type": "llama", "hidden_size": 768, "intermediate_size": 2048,
                    "num_hidden_layers": 12, "num_attention_heads": 12,
                    "num_key_value_heads": 4, "max_position_embeddings": 2048,
                    "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "vision_feature_layer": -1, "vision_feature_select_strategy": "full",
    "projector_hidden_act": "gelu",
}


# -- building (parent process) ----------------------------------------------------------------

def build_model(name: str, out: Path) -> None:
    from edgevlm.models import PRESETS, init_model, save_model
    from edgevlm.models.tokenizer import train_tokenizer

    tok = train_tokenizer([" ".join(WORDS), QUESTION, "red green blue circle square"] * 8, 300)
    vocab = 32000 if name == "llama-150m" else 512  # 512: `edgevlm init`'s default
    tok.add_tokens([f"<unused_{i}>" for i in range(vocab - len(tok))])
    cfg = LLAMA_150M if name == "llama-150m" else PRESETS["tiny-teacher"]
    save_model(init_model(cfg, tok, seed=0), out)


def build_text_only(model_dir: Path, out: Path) -> None:
    """The LLaVA model's decoder and LM head as a plain causal LM folder for the genai builder."""
    from transformers import AutoModelForCausalLM

    from edgevlm.models import load_model

    loaded = load_model(model_dir)
    llava = loaded.model
    causal = AutoModelForCausalLM.from_config(llava.config.text_config)
    causal.model.load_state_dict(llava.model.language_model.state_dict())
    causal.lm_head.load_state_dict(llava.lm_head.state_dict())
    causal.save_pretrained(out)
    loaded.processor.tokenizer.save_pretrained(out)


def build_genai(text_dir: Path, out: Path, threads: int) -> str | None:
    """onnxruntime-genai int4 model; None, or the error text when the builder fails."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text_dir),
           "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(out.parent / "genai_cache")]
    step = harness.run_step(cmd, capture=True, check=False)
    if step.returncode:
        return f"{step.command} failed: {(step.stderr or step.stdout)[-1500:]}"
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {}).update(
        {"intra_op_num_threads": threads, "inter_op_num_threads": 1})
    cfg_path.write_text(json.dumps(cfg, indent=1))
    return None


def weight_bytes(graph: Path) -> tuple[int, int]:
    """Bytes of a graph's initializers that every decode step reads (all but Gather tables),
    and the graph's node count."""
    import numpy as np
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    tables = {n.input[0] for n in model.graph.node if n.op_type.startswith("Gather")}
    total = 0
    for t in model.graph.initializer:
        if t.name not in tables:
            size = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            total += int(np.prod(t.dims, dtype=np.int64)) * size
    return total, len(model.graph.node)


def bandwidth(threads: int, mb: int = 256) -> float:
    """Best-of-5 copy bandwidth in bytes/s (read + write), `threads` copies in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    src = np.ones(mb * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    parts = np.array_split(np.arange(src.size), threads)
    spans = [(int(p[0]), int(p[-1]) + 1) for p in parts]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            t = time.perf_counter()
            list(pool.map(lambda s: np.copyto(dst[s[0]:s[1]], src[s[0]:s[1]]), spans))
            best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def prompt_ids(export_dir: Path) -> tuple[str, list[int]]:
    """A text question whose chat-templated prompt is exactly PROMPT_TOKENS ids."""
    from edgevlm.runtime.chat import ChatTemplate, Tokenizer
    from edgevlm.runtime.manifest import read_export

    info = read_export(export_dir)
    template, tok = ChatTemplate(info.chat_template, info.special_tokens), Tokenizer(
        info.tokenizer_file)
    for n in range(1, 400):
        for k in range(8):  # trailing " ?" fill the last few ids where words merge past 64
            text = " ".join(WORDS[i % len(WORDS)] for i in range(n)) + " ?" * k
            ids = tok.encode(template.render([{"role": "user", "content": text}],
                                             add_generation_prompt=True))
            if len(ids) == PROMPT_TOKENS:
                return text, ids
    raise SystemExit(f"no question gives a {PROMPT_TOKENS}-token prompt with {export_dir}")


def measure(spec: dict) -> dict:
    """Run one system in a fresh process (speed_worker.py); its result or its error."""
    step = harness.run_step([sys.executable, "-m", WORKER, json.dumps(spec)], capture=True,
                            check=False, echo=False, cwd=harness.ROOT,
                            env={"TOKENIZERS_PARALLELISM": "false"})
    for line in step.stdout.splitlines():
        if line.startswith("@@result "):
            return json.loads(line[len("@@result "):])
    return {"error": (step.stderr or step.stdout)[-2000:]}


# -- the run ----------------------------------------------------------------------------------

SYSTEMS = [  # label, worker kind, export variant (VARIANTS)
    ("transformers fp32 (eager)", "transformers", None),
    ("ours fp32", "ours", "fp32"),
    ("ours int8", "ours", "int8"),
    ("ours int4", "ours", "int4"),
    ("ours int4 accuracy_level=0", "ours", "int4-acc0"),
    ("ours int4 block 128", "ours", "int4-b128"),
    ("ours int4 traced decoder", "ours", "int4-traced"),
    ("onnxruntime-genai on our int4 export (text only)", "genai", "int4"),
    ("onnxruntime-genai int4 (text only)", "genai", None),
]
VARIANTS = {"fp32": {"precision": "fp32"}, "int8": {"precision": "int8"},
            "int4": {"precision": "int4"},
            "int4-acc0": {"precision": "int4", "accuracy_level": 0},
            "int4-b128": {"precision": "int4", "block_size": 128},
            "int4-traced": {"precision": "int4", "decoder": "traced"}}


def prepare(name: str, root: Path, threads: int, smollm2: Path) -> dict:
    """Model folder, exports, the genai model (or its error); built once."""
    from edgevlm.export import ExportConfig, export

    d = root / name
    paths = {"model": smollm2 if name == "smollm2" else d / "model", "genai": d / "genai_int4",
             "genai_error": None}
    if not paths["model"].is_dir():
        if name == "smollm2":
            raise SystemExit(f"{smollm2} is missing; make it with python -m benchmarks.smollm2 "
                             "make")
        log(f"{name}: building the random model")
        build_model(name, paths["model"])
    for variant, kw in VARIANTS.items():
        paths[variant] = d / f"export_{variant}"
        if not paths[variant].is_dir():
            log(f"{name}: edgevlm export {kw}")
            export(paths["model"], paths[variant], ExportConfig(validate=False, **kw))
    if not (paths["genai"] / "genai_config.json").is_file():
        log(f"{name}: onnxruntime-genai builder, int4 cpu")
        if not (d / "text_only").is_dir():
            build_text_only(paths["model"], d / "text_only")
        paths["genai_error"] = build_genai(d / "text_only", paths["genai"], threads)
    return paths


TIMED = ("decode_tokens_per_s", "prefill_ms", "ttft_image_ms", "peak_rss")


def combine(runs: list[dict]) -> dict:
    """One row from a system's rounds: the median of each timed figure (each round's kept under
    "rounds"), the rest from the first round; an error if any round failed."""
    import statistics

    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    row = dict(runs[0])
    for key in TIMED:
        values = [r[key] for r in runs]
        if all(v is not None for v in values):
            row[key] = statistics.median(values)
    row["rounds"] = {key: [r[key] for r in runs] for key in TIMED}
    return row


def derive(rows: dict, paths: dict, kv_bytes: int, bw: float) -> None:
    """Weight bytes per token, the bandwidth bound and ratios to transformers, in place."""
    ref = rows["transformers fp32 (eager)"]
    kinds = {label: (kind, variant) for label, kind, variant in SYSTEMS}
    for label, r in rows.items():
        kind, variant = kinds.get(label, ("llama.cpp", None))  # llama.cpp rows: bytes measured
        if "error" in r:
            continue
        if kind == "ours":
            manifest = json.loads((paths[variant] / "edgevlm.json").read_text())
            graph = paths[variant] / manifest["components"]["decoder_model_merged"]["file"]
            r["weight_bytes_per_token"], r["graph_nodes"] = weight_bytes(graph)
        elif kind == "genai":
            root = paths[variant] if variant else paths["genai"]
            cfg = json.loads((root / "genai_config.json").read_text())
            r["weight_bytes_per_token"], r["graph_nodes"] = weight_bytes(
                root / cfg["model"]["decoder"]["filename"])
        per_token = r["weight_bytes_per_token"] + kv_bytes
        r["bound_tokens_per_s"] = bw / per_token
        r["fraction_of_bound"] = r["decode_tokens_per_s"] / r["bound_tokens_per_s"]
        if "error" not in ref:
            r["x_decode"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
            r["x_prefill"] = r["prefill_ms"] / ref["prefill_ms"]
            r["x_ttft_image"] = (r["ttft_image_ms"] / ref["ttft_image_ms"]
                                 if r["ttft_image_ms"] else None)
            r["x_peak_rss"] = r["peak_rss"] / ref["peak_rss"]
            r["same_tokens_as_transformers"] = (r["tokens"] == ref["tokens"]
                                                if r["tokens"] is not None else None)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = harness.parser(__doc__, out=harness.RESULTS / "runtime_speed.json",
                            work=Path("/tmp/edgevlm_runtime_speed"), threads=2)
    parser.add_argument("--models", default="smollm2,llama-150m")
    parser.add_argument("--smollm2-dir", type=Path,
                        default=harness.ROOT / "runs" / "smollm2-llava0")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system per round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over every system, "
                        "interleaved; the table gives each figure's median over rounds")
    parser.add_argument("--llama-cpp", type=Path, default=None, help="Folder holding llama-bench "
                        "and llama-quantize (smollm2 only; see speed_llamacpp.py)")
    args = parser.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np
    from PIL import Image

    args.work.mkdir(parents=True, exist_ok=True)
    image = args.work / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)).save(image)
    bw = {str(n): bandwidth(n) for n in sorted({1, args.threads})}
    log(f"bandwidth {', '.join(f'{k} thr {v / 1e9:.1f} GB/s' for k, v in bw.items())}")
    results = {"command": record.command, "machine": record.machine,
               "threads": args.threads, "repeats": args.repeats, "rounds": args.rounds,
               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS,
               "bandwidth_bytes_per_s": bw, "models": {}}
    for name in args.models.split(","):
        paths = prepare(name, args.work, args.threads, args.smollm2_dir)
        text, ids = prompt_ids(paths["fp32"])
        cfg = json.loads((paths["model"] / "config.json").read_text())["text_config"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        kv_bytes = (2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
                    * (PROMPT_TOKENS + NEW_TOKENS // 2))
        ggufs = {}
        if name == "smollm2":
            ggufs = (llamacpp.prepare(args.llama_cpp, args.work) if args.llama_cpp else
                     dict.fromkeys(llamacpp.TYPES, "not measured: pass --llama-cpp BIN_DIR"))
        # Every system once per round, rounds in turn: this VM's speed drifts by tens of
        # percent over minutes, and interleaving puts each system through the same drift.
        rounds: dict[str, list[dict]] = {}
        for k in range(args.rounds):
            for label, kind, variant in SYSTEMS:
                if kind == "genai" and not variant and paths["genai_error"]:
                    rounds[label] = [{"error": paths["genai_error"]}]
                    continue
                log(f"{name}: round {k + 1}/{args.rounds}: {label}")
                spec = {"kind": kind, "threads": args.threads, "repeats": args.repeats,
                        "ids": ids, "text": text, "question": QUESTION,
                        "new_tokens": NEW_TOKENS, "image": str(image),
                        "model": str(paths["model"]), "export": str(paths.get(variant, "")),
                        "genai": str(paths[variant] if kind == "genai" and variant
                                     else paths["genai"]),
                        "precision": VARIANTS[variant]["precision"] if variant else None}
                rounds.setdefault(label, []).append(measure(spec))
            for t, gguf in ggufs.items():
                label = f"llama.cpp {t} (text only)"
                log(f"{name}: round {k + 1}/{args.rounds}: {label}")
                rounds.setdefault(label, []).append(
                    {"error": gguf} if isinstance(gguf, str) else
                    {**llamacpp.measure(args.llama_cpp, gguf, args.threads, PROMPT_TOKENS,
                                        NEW_TOKENS, args.repeats), "new_tokens": NEW_TOKENS})
        rows = {label: combine(runs) for label, runs in rounds.items()}
        derive(rows, paths, kv_bytes, bw[str(args.threads)])
        results["models"][name] = {"text_config": cfg, "kv_bytes_per_token": kv_bytes,
                                   "systems": rows}
    harness.write(args.out, results, markdown(results), record)
    print(markdown(results))


if __name__ == "__main__":
    main()
