"""Token-level perplexity of a model's language model on real text (`edgevlm eval --text`).

The quantization yardstick on real weights: accuracy on a synthetic VQA set cannot rank methods
that all keep it, while perplexity on English text moves with every weight the LM has. The text
is cut into non-overlapping windows of `context` tokens (the tail shorter than a window is
dropped), each window is scored on its own, and every token but a window's first is predicted
from the tokens before it in that window:

    ppl = exp( Σ_w Σ_{t=1}^{C-1} −log p(x_{w,t} | x_{w,<t}) / (W · (C − 1)) )

which is what a plain transformers loop of `model(input_ids=w, labels=w).loss` over the windows
gives. No BOS is inserted, so the figure is the text's own tokens only. `pydoc_data.topics`, the
help text that ships with every Python, is the default text (`edgevlm data pydoc`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from edgevlm.errors import UserError
from edgevlm.progress import Progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens_scored: int
    windows: int
    context: int
    seconds: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def pydoc_text() -> str:
    """The English help text of `pydoc_data.topics`, in a fixed (sorted) order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UserError(f"--text {path} does not exist; `edgevlm data pydoc {path}` writes "
                        "Python's own help text there") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--text {path} is not a readable UTF-8 text file ({e})") from e
    if not text.strip():
        raise UserError(f"--text {path} is empty; give a file of real text")
    return text


def windows(ids: list[int], context: int, max_tokens: int | None, where: str) -> list[list[int]]:
    """Non-overlapping windows of `context` token ids from the first `max_tokens` ids."""
    if context < 2:
        raise UserError(f"--context {context} is too short; a window needs at least 2 tokens")
    if max_tokens is not None and max_tokens < context:
        raise UserError(f"--max-tokens {max_tokens} is below --context {context}; raise it or "
                        "lower --context")
    ids = ids[:max_tokens] if max_tokens is not None else ids
    if len(ids) < context:
        raise UserError(f"{where} has {len(ids)} tokens, shorter than one context of {context}; "
                        "give a longer text or lower --context")
    return [ids[i: i + context] for i in range(0, len(ids) - context + 1, context)]


def perplexity(loaded, text: str, context: int = 512, max_tokens: int | None = 8192,
               batch_size: int = 4, where: str = "the text", quiet: bool = False
               ) -> PerplexityResult:
    """Perplexity of `loaded.model`'s language model (float or dequantized) on `text`."""
    import torch
    import torch.nn.functional as F

    model = loaded.model
    limit = model.config.text_config.max_position_embeddings
    if context > limit:
        raise UserError(f"--context {context} is over the model's {limit} positions; lower it")
    ids = loaded.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    wins = windows(ids, context, max_tokens, where)
    device = next(model.parameters()).device
    total, count, t0 = 0.0, 0, time.time()
    with Progress("perplexity", len(wins), enabled=not quiet) as bar, torch.inference_mode():
        for i in range(0, len(wins), batch_size):
            batch = torch.tensor(wins[i: i + batch_size], device=device)
            logits = model(input_ids=batch).logits.float()  # (B, C, V)
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(),
                                  reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
            bar.update(len(batch), ppl=math.exp(total / count))
    mean = total / count
    return PerplexityResult(math.exp(mean), mean, count, len(wins), context, time.time() - t0)
