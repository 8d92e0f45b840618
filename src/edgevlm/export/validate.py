"""Parity of the exported graphs against the torch model they came from.

Two checks on a shapes-style image and a chat prompt:
  * per component: each graph on the torch inputs, max-abs and mean-abs error of its output
    (vision on a batch of two images, embed_tokens on the prompt ids, the decoder on the prompt
    with image features scattered in and an empty past);
  * end to end: greedy continuation for `new_tokens` tokens through the three graphs with a
    minimal numpy loop (the runtime proper is edgevlm.runtime), against transformers `generate`.
    End-of-sequence is suppressed on both sides (min_new_tokens), so every step really runs.
The torch side is computed once, before export (`torch_reference`), so fp16 export can turn the
model to half precision in place without a second copy and still be compared with fp32 torch.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from edgevlm.export.reference import FP32_MAX_ABS, Reference, step_positions
from edgevlm.families import family_of
from edgevlm.runtime import contract
from edgevlm.runtime.contract import Activations, DecoderKind, Precision
from edgevlm.runtime.tiling import full_mask

# Pass thresholds. fp32 must match torch to float rounding (FP32_MAX_ABS). Other precisions are
# held to an error relative to the largest reference value of that output, measured on tiny random
# models with room to spare; the quantized greedy tokens may diverge and are only reported.
RELATIVE_TOLERANCE = {"fp16": 0.02, "int8": 0.15, "int4": 0.35}
PROMPT = "<image>\nWhat color is the circle?"


@dataclass(frozen=True)
class ComponentError:
    precision: str
    max_abs: float
    mean_abs: float
    reference_max_abs: float
    tolerance: float  # on max_abs
    passed: bool
    gated: bool = True  # False: reported only (a built int4/int8 decoder or an int8 vision
    # encoder against the float model; its gate is against torch carrying the same integers)


@dataclass(frozen=True)
class GreedyResult:
    new_tokens: int
    matching_prefix: int  # tokens equal to torch's before the first difference
    identical: bool
    logits_max_abs: float  # over the steps whose prefixes still agree
    logits_mean_abs: float
    steps_compared: int
    required_identical: bool  # all components fp32


@dataclass(frozen=True)
class Parity:
    components: dict[str, ComponentError]
    greedy: GreedyResult
    failures: list[str] = field(default_factory=list)
    graph_check: object | None = None  # edgevlm.export.graph_check.GraphCheck: a built int4/int8
    # decoder against the torch model carrying its integers
    vision_check: object | None = None  # edgevlm.export.vision_int8.VisionCheck: an int8 vision
    # encoder against the torch tower carrying its integers

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": self.failures,
                "components": {k: asdict(v) for k, v in self.components.items()},
                "greedy": asdict(self.greedy),
                "graph_check": asdict(self.graph_check) if self.graph_check else None,
                "vision_check": asdict(self.vision_check) if self.vision_check else None,
                "tolerances": {"fp32_max_abs": FP32_MAX_ABS, "relative": RELATIVE_TOLERANCE}}


def sample_images(size: int):
    """Two fixed shapes scenes, drawn as edgevlm.data.shapes draws its data."""
    from edgevlm.data.shapes import Obj, draw

    scenes = [[Obj("red", "circle", 4), Obj("blue", "square", 0)],
              [Obj("yellow", "triangle", 8)]]
    return [draw(objs, size, random.Random(i)) for i, objs in enumerate(scenes)]


def validation_pixels(loaded, count: int = 2) -> dict:
    """The vision inputs of the first `count` validation images, float32 torch tensors."""
    family = family_of(loaded.model)
    images = sample_images(48)[:count]
    return {k: (v.float() if v.is_floating_point() else v)
            for k, v in family.pixel_inputs(loaded.processor, images).items()}


def vision_inputs(loaded):
    """What the vision graph is checked on: the validation images' pixels, or a patch graph's
    feeds, one dict per image (Qwen2-VL)."""
    inputs = validation_pixels(loaded)
    if family_of(loaded.model).image_layout == "patches":
        return _patch_feeds(loaded.model, inputs)
    return inputs["pixel_values"].numpy()


def _patch_feeds(model, inputs: dict) -> list[dict]:
    """A patch vision graph's feeds (Qwen2-VL), one image per call, under the contract's names."""
    family = family_of(model)
    encoder = family.vision_graph(model)
    names = list(contract.vision_io(patches=family.patch_kind(model.config)).inputs)
    grids = inputs["image_grid_thw"]
    rows = np.cumsum([0] + [int(g.prod()) for g in grids])
    return [dict(zip(names, encoder.feeds(inputs["pixel_values"][rows[i]:rows[i + 1]],
                                          grids[i:i + 1]), strict=True))
            for i in range(len(grids))]


def _positions(loaded, ids, first: dict) -> tuple[dict, dict]:
    """M-RoPE families: (the position_ids a forward on embeddings needs, the Reference fields
    for the graphs); ({}, {}) for the rest."""
    family = family_of(loaded.model)
    if family.rope_index is None:
        return {}, {}
    positions, delta = family.rope_index(loaded.model, ids, first, loaded.processor)
    return ({"position_ids": positions},
            {"positions": positions.numpy(), "rope_delta": int(delta[0, 0])})


def torch_reference(loaded, new_tokens: int) -> Reference:
    """Run the torch model once on the validation inputs."""
    import torch
    from transformers import GenerationConfig

    from edgevlm.data import IMAGE_TAG, render_chat, to_messages

    model, tok = loaded.model, loaded.processor.tokenizer
    family = family_of(model)
    images = sample_images(48)
    text = render_chat(tok, to_messages(((PROMPT, ""),), with_last_answer=False),
                       add_generation_prompt=True)
    text = text.replace(IMAGE_TAG, family.expand_image(loaded.processor, loaded.num_image_tokens,
                                                       images[0]))
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    inputs, first = validation_pixels(loaded), validation_pixels(loaded, 1)
    patches = family.image_layout == "patches"
    eos = model.generation_config.eos_token_id
    eos = sorted({tok.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    forward_positions, fields = _positions(loaded, ids, first)
    with torch.no_grad():
        width = model.config.text_config.hidden_size
        feats = family.image_features(model, inputs)
        if not patches:  # per image; a patch family's images differ in token count
            feats = feats.reshape(-1, loaded.num_image_tokens, width)
        slot_feats = family.image_features(model, first).reshape(-1, width)
        embeds = model.get_input_embeddings()(ids)
        merged = embeds.masked_scatter((ids == loaded.image_token_id)[..., None], slot_feats)
        logits = model(inputs_embeds=merged, attention_mask=torch.ones_like(ids),
                       **forward_positions).logits
        gen = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), **first,
            **(family.text_inputs(loaded.processor, ids) if family.text_inputs else {}),
            generation_config=GenerationConfig(
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                eos_token_id=eos, pad_token_id=tok.pad_token_id, output_logits=True,
                return_dict_in_generate=True))
    return Reference(
        inputs["pixel_values"].numpy(), feats.float().numpy(), ids.numpy(), embeds.float().numpy(),
        logits.float().numpy(), gen.sequences[0, ids.shape[1]:].tolist(),
        torch.cat(gen.logits).float().numpy(), loaded.image_token_id, eos,
        model.get_input_embeddings()(gen.sequences[0, ids.shape[1]:]).detach().float().numpy(),
        slot_feats.float().numpy(), _patch_feeds(model, inputs) if patches else None, **fields)


def _error(precision: str, got: np.ndarray, want: np.ndarray, gated: bool = True
           ) -> ComponentError:
    diff = np.abs(got.astype(np.float64) - want)
    scale = float(np.abs(want).max())
    tol = (FP32_MAX_ABS if Precision(precision) is Precision.FP32
           else RELATIVE_TOLERANCE[precision] * scale)
    max_abs = float(diff.max())
    return ComponentError(precision, max_abs, float(diff.mean()), scale, tol,
                          max_abs < tol or not gated, gated)


def vision_feeds(session, pixels: np.ndarray) -> dict:
    """The vision encoder's feeds: the pixels, and for a tiled (idefics3) graph a pixel mask of
    ones (every tile of one image is full)."""
    feeds = {"pixel_values": pixels}
    if "pixel_attention_mask" in {i.name for i in session.get_inputs()}:
        feeds["pixel_attention_mask"] = full_mask(pixels)
    return feeds


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _Dynamic:
    """The default graphs: any batch, a past that grows with every pass."""

    def __init__(self, sessions: dict, dims):
        self.s, self.dims = sessions, dims
        self.names = contract.past_names(dims.num_layers)

    def vision(self, pixels: np.ndarray) -> np.ndarray:
        return self.s["vision_encoder"].run(None, vision_feeds(self.s["vision_encoder"],
                                                               pixels))[0]

    def patch_vision(self, feeds: list[dict]) -> np.ndarray:
        """A patch graph (Qwen2-VL): one image per call, every image's tokens concatenated."""
        return np.concatenate([self.s["vision_encoder"].run(None, f)[0] for f in feeds])

    def embed(self, ids: np.ndarray) -> np.ndarray:  # (1, S) -> (1, S, D)
        return self.s["embed_tokens"].run(None, {"input_ids": ids})[0]

    def new_state(self) -> dict:
        shape = (1, self.dims.num_kv_heads, 0, self.dims.head_dim)
        return {n: np.zeros(shape, np.float32) for n in self.names}

    def decode(self, embeds, start: int, past: dict, positions=None):
        total = start + embeds.shape[1]
        if positions is None:
            positions = np.arange(start, total, dtype=np.int64)[None]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), np.int64),
                 "position_ids": positions, **past}
        out = self.s["decoder_model_merged"].run(None, feeds)
        return out[0], dict(zip(self.names, out[1:], strict=True))


class _Built(_Dynamic):
    """A builder decoder: KV buffers shared by past and present (edgevlm.runtime.kv_buffer),
    long enough for the validation prompt and its answer."""

    def __init__(self, sessions: dict, dims, positions: int):
        from edgevlm.runtime.kv_buffer import SharedKV

        super().__init__(sessions, dims)
        self.kv, self.positions = SharedKV(sessions["decoder_model_merged"], dims.num_layers), \
            positions

    def new_state(self):
        return self.kv.new_cache(self.positions)

    def decode(self, embeds, start: int, cache, positions=None):
        logits = self.kv.decode(embeds.astype(np.float32), start, cache, positions=positions)
        return logits.astype(np.float32), cache


class _Static:
    """The mobile graphs: batch 1, fixed passes over a fixed cache (edgevlm.runtime.static)."""

    def __init__(self, sessions: dict, dims, rope: np.ndarray):
        from edgevlm.runtime.static import StaticGraphs

        self.s = sessions
        self.g = StaticGraphs(sessions["embed_tokens"], sessions["decoder_model_merged"], rope,
                              dims.num_layers)

    def vision(self, pixels: np.ndarray) -> np.ndarray:  # batch 1: one image at a time
        session = self.s["vision_encoder"]
        return np.concatenate([session.run(None, vision_feeds(session, p[None]))[0]
                               for p in pixels])

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.g.embed(ids[0])

    def new_state(self):
        return self.g.new_cache()

    def decode(self, embeds, start: int, cache, positions=None):  # 1-D only (no M-RoPE)
        return self.g.decode(embeds, start, cache), cache


def _vision(graphs, ref: Reference, first_only: bool = False) -> np.ndarray:
    if ref.vision_feeds is not None:
        return graphs.patch_vision(ref.vision_feeds[:1] if first_only else ref.vision_feeds)
    return graphs.vision(ref.pixel_values[:1] if first_only else ref.pixel_values)


def _greedy(graphs, ref: Reference) -> tuple[list[int], np.ndarray]:
    """The numpy generation loop over the three graphs; returns tokens and each step's logits."""
    feats = _vision(graphs, ref, first_only=True)
    embeds = graphs.embed(ref.input_ids)
    embeds[ref.input_ids == ref.image_token_id] = feats.reshape(-1, feats.shape[-1])
    total = ref.input_ids.shape[1]
    logits, past = graphs.decode(embeds, 0, graphs.new_state(), ref.positions)
    tokens, steps = [], []
    for _ in range(len(ref.tokens)):
        step = logits[0, -1]
        steps.append(step)
        masked = step.copy()
        masked[ref.suppressed] = -np.inf
        tokens.append(int(masked.argmax()))
        embeds = graphs.embed(np.array([[tokens[-1]]]))
        logits, past = graphs.decode(embeds, total, past, step_positions(ref, total))
        total += 1
    return tokens, np.stack(steps)


def validate(paths: dict[str, Path], precisions: dict[str, Precision], ref: Reference, dims,
             rope: np.ndarray | None = None, decoder: DecoderKind = DecoderKind.TRACED,
             carried: Reference | None = None, accuracy_level: int | None = None,
             activations: Activations = Activations.FP32, vision_carried=None) -> Parity:
    """Compare the graphs at `paths` (one per component) with the torch reference. `rope`
    (the mobile profile's cos/sin table) selects the static graphs' calling convention,
    `decoder` "builder" the shared KV buffers. `carried` (a built int4/int8 decoder): the
    reference of the torch model carrying the decoder's integers, which the decoder is held to
    (edgevlm.export.graph_check); against `ref` (float) its error is then only reported.
    `vision_carried` (an int8 vision encoder; edgevlm.export.vision_int8.Int8Cost): the torch
    tower carrying its integers, which the graph is held to (vision_int8.check); its error
    against the float tower is then only reported."""
    sessions = {c: _session(p) for c, p in paths.items()}
    positions = ref.input_ids.shape[1] + len(ref.tokens) + 1
    graphs = (_Static(sessions, dims, rope) if rope is not None else
              _Built(sessions, dims, positions) if decoder is DecoderKind.BUILDER else
              _Dynamic(sessions, dims))
    merged = ref.inputs_embeds.copy()
    merged[ref.input_ids == ref.image_token_id] = ref.slot_features
    outputs = {
        "vision_encoder": _vision(graphs, ref),
        "embed_tokens": graphs.embed(ref.input_ids),
        "decoder_model_merged": graphs.decode(merged, 0, graphs.new_state(), ref.positions)[0],
    }
    built = decoder is DecoderKind.BUILDER
    last = slice(-1, None) if built else slice(None)  # built: last logits only
    wanted = {"vision_encoder": ref.image_features, "embed_tokens": ref.inputs_embeds,
              "decoder_model_merged": ref.prompt_logits[:, last]}
    held = {"decoder_model_merged": carried is not None,  # gated against carried integers
            "vision_encoder": vision_carried is not None}
    errors = {c: _error(precisions[c], outputs[c], wanted[c], not held.get(c, False))
              for c in contract.COMPONENTS}
    failures = [f"{c} ({e.precision}): max-abs error {e.max_abs:.3g} is over {e.tolerance:.3g}"
                for c, e in errors.items() if not e.passed]
    vision_check = None
    if vision_carried is not None:
        from edgevlm.export import vision_int8

        vision_check = vision_int8.check(
            paths["vision_encoder"],
            ref.vision_feeds if ref.vision_feeds is not None else ref.pixel_values,
            vision_carried)
        failures += vision_check.failures()
    check = None
    if carried is not None:
        from edgevlm.export.graph_check import check_graph

        check = check_graph(paths["decoder_model_merged"], accuracy_level or 0, carried, dims,
                            activations)
        failures += check.failures()

    tokens, steps = _greedy(graphs, ref)
    prefix = next((i for i, (a, b) in enumerate(zip(tokens, ref.tokens, strict=True))
                   if a != b), len(tokens))
    compared = min(prefix + 1, len(tokens))  # the step that diverged still saw equal prefixes
    diff = np.abs(steps[:compared].astype(np.float64) - ref.step_logits[:compared])
    all_fp32 = all(Precision(p) is Precision.FP32 for p in precisions.values())
    greedy = GreedyResult(len(tokens), prefix, tokens == ref.tokens, float(diff.max()),
                          float(diff.mean()), compared, all_fp32)
    if all_fp32 and not greedy.identical:
        failures.append(f"greedy tokens differ from torch generate at step {prefix} of "
                        f"{len(tokens)}")
    if all_fp32 and greedy.logits_max_abs >= FP32_MAX_ABS:
        failures.append(f"greedy logits max-abs error {greedy.logits_max_abs:.3g} is over "
                        f"{FP32_MAX_ABS}")
    return Parity(errors, greedy, failures, check, vision_check)
