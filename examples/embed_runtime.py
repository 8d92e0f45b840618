"""An app that embeds the edgevlm runtime: answer questions about an image, streaming.

Needs only the device install (numpy, onnxruntime, tokenizers, pillow, jinja2); no torch.

    python examples/embed_runtime.py runs/demo/export runs/demo/shapes/images/eval_00000.png \
        --question "What color is the circle?" --question "How many shapes are there?"

Without --question it reads one question per line from standard input until an empty line or
end of input, so it also works as a small interactive chat about one picture.
"""

from __future__ import annotations

import argparse
import json
import sys

from edgevlm.runtime import VLM


def answer(vlm: VLM, image: str, question: str, max_new_tokens: int) -> dict:
    """Stream one answer to stdout as it is decoded; return the answer and its timings."""
    print(f"Q: {question}\nA: ", end="", flush=True)
    stream = vlm.stream(image, question, max_new_tokens=max_new_tokens)
    for piece in stream:
        print(piece, end="", flush=True)
    result = stream.result
    t = result.timings
    print(f"\n   ({t.ttft_s * 1000:.1f} ms to first token, "
          f"{t.decode_tokens_per_s:.0f} tokens/s, {result.finish_reason})", flush=True)
    return {"question": question, "answer": result.text, "ttft_s": t.ttft_s,
            "decode_tokens_per_s": t.decode_tokens_per_s, "n_new_tokens": t.n_new_tokens}


def questions_from_stdin():
    for line in sys.stdin:
        line = line.strip()
        if not line:
            return
        yield line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export_dir", help="a directory written by `edgevlm export`")
    ap.add_argument("image", help="the picture to ask about")
    ap.add_argument("--question", action="append", help="ask this (repeatable)")
    ap.add_argument("--provider", default="auto", help="auto, cpu, cuda, coreml, nnapi, ...")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--json", dest="json_out", help="also write the answers to this JSON file")
    args = ap.parse_args(argv)

    vlm = VLM.load(args.export_dir, provider=args.provider, threads=args.threads)
    print(f"loaded {args.export_dir} on {vlm.provider} in {vlm.load_s:.2f} s", flush=True)
    answers = [answer(vlm, args.image, q, args.max_new_tokens)
               for q in (args.question or questions_from_stdin())]
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"provider": vlm.provider, "answers": answers}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
