"""Greedy answers from the torch model, scored by normalized exact match per question type.

This is the torch reference every later stage (quantized model, ONNX export, runtime) is
compared against: transformers `generate`, greedy, on the same chat-template prompt. A batch
may mix image and text-only samples (pixel_values has one row per image); accuracy is over all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgevlm.data import (
    Sample,
    expand_images,
    pixel_inputs,
    pixels_of,
    render_chat,
    text_inputs,
    to_messages,
)
from edgevlm.data.metrics import Score
from edgevlm.errors import UserError
from edgevlm.models import LoadedModel
from edgevlm.progress import Progress


@dataclass
class Prediction:
    id: str
    type: str
    question: str
    reference: str
    prediction: str
    correct: bool


@dataclass
class EvalResult:
    score: Score
    predictions: list[Prediction]
    seconds: float

    @property
    def accuracy(self) -> float:
        return self.score.accuracy

    def to_dict(self) -> dict:
        return {**self.score.to_dict(), "seconds": self.seconds,
                "predictions": [p.__dict__ for p in self.predictions]}


def prompt_text(loaded: LoadedModel, sample: Sample) -> str:
    """The generation prompt for a sample's last question, `<image>` expanded as the model's
    family expands it."""
    msgs = to_messages(sample.turns, with_last_answer=False)
    text = render_chat(loaded.processor.tokenizer, msgs, add_generation_prompt=True)
    return expand_images(loaded.processor, text, loaded.num_image_tokens, sample)


def check_context(loaded: LoadedModel, sample: Sample, prompt_tokens: int,
                  max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens to generate, runs past the model's positions (the
    runtime refuses it the same way): beyond them RoPE extrapolates and the answer is garbage."""
    limit = loaded.model.config.text_config.max_position_embeddings
    if prompt_tokens + max_new_tokens > limit:
        raise UserError(f"sample {sample.id}: its prompt is {prompt_tokens} tokens and "
                        f"--max-new-tokens adds {max_new_tokens}, past the model's {limit} "
                        "positions (max_position_embeddings); shorten the question or lower "
                        "--max-new-tokens")


def generate_answers(loaded: LoadedModel, samples: list[Sample], max_new_tokens: int = 16,
                     batch_size: int = 16, tokens: bool = False) -> list:
    """Greedy continuations (text, or token-id lists with `tokens=True`) for each sample."""
    import torch

    tok = loaded.processor.tokenizer
    model = loaded.model
    device = next(model.parameters()).device
    outs = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i: i + batch_size]
        ids = [tok(prompt_text(loaded, s), add_special_tokens=False)["input_ids"] for s in chunk]
        for s, row in zip(chunk, ids):
            check_context(loaded, s, len(row), max_new_tokens)
        width = max(map(len, ids))
        input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for j, row in enumerate(ids):  # left padding, so every row ends where generation starts
            input_ids[j, width - len(row):] = torch.tensor(row)
            mask[j, width - len(row):] = 1
        # generate must not see pixel_values=None (it would run the vision tower on it).
        images = {k: v.to(device) for k, v in
                  pixels_of({**pixel_inputs(loaded.processor, chunk),
                             **text_inputs(loaded.processor, input_ids)}, model.dtype).items()}
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 **images, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for row in gen[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            outs.append(row if tokens else tok.decode(row, skip_special_tokens=True).strip())
    return outs


def evaluate(loaded: LoadedModel, samples: list[Sample], max_new_tokens: int = 16,
             batch_size: int = 16, quiet: bool = False) -> EvalResult:
    """Accuracy of greedy answers against each sample's last gpt turn."""
    score, preds, t0 = Score(), [], time.time()
    with Progress("eval", len(samples), enabled=not quiet, unit="samples") as bar:
        for i in range(0, len(samples), batch_size):
            chunk = samples[i: i + batch_size]
            for s, answer in zip(chunk, generate_answers(loaded, chunk, max_new_tokens,
                                                         batch_size)):
                ok = score.add(answer, s.answer, s.type)
                preds.append(Prediction(s.id, s.type, s.question, s.answer, answer, ok))
            bar.update(len(chunk), acc=score.accuracy)
    return EvalResult(score, preds, time.time() - t0)
