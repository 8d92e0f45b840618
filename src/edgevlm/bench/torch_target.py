"""The torch side of `edgevlm bench`: a model folder answered by transformers `generate`.

Greedy, batch 1, on the prompt the reference evaluation renders (edgevlm.evaluate.prompt_text),
so its answers are the ones an fp32 export must reproduce token for token. Each answer measures
the spans the runtime reports (runtime/model.py `Timings`):

  preprocess  chat template + tokenization + image processor
  vision      `get_image_features` on the pixels, timed on its own
  prefill     one forward over the prompt embeddings (image features in the image slots),
              filling the cache and keeping the last position's logits, as generate's first
              step does, timed on its own
  TTFT, decode  from the `generate` call itself: a streamer timestamps every token, so time to
              first token is preprocess + (first token - generate start) and the decode rate is
              (tokens after the first) / (last token - first token)

Vision and prefill are extra passes beside `generate`; the answer comes from `generate` alone.
Imported by edgevlm.bench.harness only for model-folder targets, so benching exports needs no
torch.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from edgevlm.bench.harness import BenchConfig, Run
from edgevlm.data import Sample, pixel_inputs, pixels_of
from edgevlm.errors import UserError
from edgevlm.evaluate import check_context, prompt_text
from edgevlm.families import family_of
from edgevlm.models import load_model
from edgevlm.quant.checkpoint import read_scheme

_PRECISIONS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


class TokenClock:
    """A generate streamer that only timestamps: the first put is the prompt, each later put is
    one new token."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


class TorchTarget:
    """A LLaVA model folder on torch (CPU, or CUDA when asked for and present)."""

    backend = "transformers"

    def __init__(self, path: Path, cfg: BenchConfig):
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if cfg.provider not in ("auto", "cpu", "cuda"):
            raise UserError(f"--provider {cfg.provider} applies to exports; a model folder "
                            f"({path}) runs on torch with cpu or cuda (or auto)")
        cuda = torch.cuda.is_available() and cfg.provider in ("auto", "cuda")
        if cfg.provider == "cuda" and not cuda:
            raise UserError(f"--provider cuda was asked for {path} but torch {torch.__version__} "
                            "sees no CUDA device; use --provider cpu")
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        t0 = time.perf_counter()
        self.path = Path(path)
        self.device = "cuda" if cuda else "cpu"
        self.loaded = load_model(path, device=self.device)
        self.load_s = time.perf_counter() - t0
        self.provider = self.device
        model = self.loaded.model
        scheme = read_scheme(path)
        self.precision = (f"{scheme.quant_method or 'quantized'}" if scheme is not None
                          else _PRECISIONS.get(model.dtype, str(model.dtype)))
        self.weight_bits = (scheme.num_bits if scheme is not None
                            else torch.finfo(model.dtype).bits)

    def answer(self, sample: Sample, max_new_tokens: int) -> Run:
        loaded, model = self.loaded, self.loaded.model
        tok = loaded.processor.tokenizer
        t0 = time.perf_counter()
        ids = tok(prompt_text(loaded, sample), add_special_tokens=False,
                  return_tensors="pt")["input_ids"].to(self.device)  # (1, S)
        check_context(loaded, sample, ids.shape[1], max_new_tokens)
        images = {k: v.to(self.device) for k, v in
                  pixels_of(pixel_inputs(loaded.processor, [sample]), model.dtype).items()}
        mask = torch.ones_like(ids)
        preprocess_s = time.perf_counter() - t0
        with torch.inference_mode():
            t = time.perf_counter()
            feats = self._image_features(images) if images else None  # (N_img, D)
            vision_s = self._since(t) if images else 0.0  # as the runtime: 0 without an image
            t = time.perf_counter()
            slots = ids == loaded.image_token_id
            # Image slots embed as token 0 first: the image token id may lie past the table.
            embeds = model.get_input_embeddings()(torch.where(slots, 0, ids))  # (1, S, D)
            if feats is not None:
                embeds[slots] = feats.to(embeds.dtype)
            model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)
            prefill_s = self._since(t)
            clock = TokenClock()
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **images,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                 streamer=clock)
        new = out[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        stamps = clock.times[1:]  # one per generated token, the end-of-sequence one included
        assert stamps, "generate produced no token"
        steps = len(stamps) - 1
        decode_s = stamps[-1] - stamps[0]
        rate = steps / decode_s if steps and decode_s > 0 else math.nan
        return Run(tok.decode(new, skip_special_tokens=True).strip(), len(new), ids.shape[1],
                   preprocess_s, vision_s, prefill_s, preprocess_s + stamps[0] - t,
                   decode_s, rate)

    def _image_features(self, pixels):
        feats = family_of(self.loaded.model).image_features(self.loaded.model, pixels)
        return feats.reshape(-1, feats.shape[-1])

    def _since(self, t: float) -> float:
        if self.device == "cuda":  # kernels run asynchronously; wait before reading the clock
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def files(self) -> list[Path]:
        """The weight files a load reads (safetensors shards, or .bin where that is all)."""
        files = sorted(p for p in self.path.iterdir() if p.suffix in WEIGHT_SUFFIXES
                       and p.is_file() and not p.name.startswith("training_"))
        safetensors = [p for p in files if p.suffix == ".safetensors"]
        return safetensors or files

    def versions(self) -> dict[str, str]:
        import transformers

        return {"torch": torch.__version__, "transformers": transformers.__version__}

    def facts(self, sample: Sample) -> dict:
        """The planner's facts (bench.harness.ExportTarget.facts), from the torch model."""
        loaded = self.loaded
        ids = loaded.processor.tokenizer(prompt_text(loaded, sample),
                                         add_special_tokens=False)["input_ids"]
        return {"family": family_of(loaded.model).name,
                "visual_tokens": ids.count(loaded.image_token_id),
                "weight_bits": self.weight_bits}
