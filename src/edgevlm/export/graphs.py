"""The three exportable graphs of a LLaVA model, as torch modules with the contract's IO.

A LlavaForConditionalGeneration is split the way transformers.js and the SmolVLM ONNX releases
split it (runtime/contract.py): a vision encoder (tower + feature-layer selection + projector),
the token embedding, and a decoder that takes embeddings and a flat key/value cache. Splitting
at embeddings lets the runtime scatter image features into the prompt with one numpy line.

Each wrapper shares the model's parameters (no copies) and keeps float32 IO at every weight
dtype: an fp16 model casts its inputs down and its outputs up inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from edgevlm.families import family_of, part
from edgevlm.families.backbones import has_cls_token


@dataclass(frozen=True)
class TextDims:
    """Decoder sizes the cache layout and the manifest need."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int


def text_dims(config) -> TextDims:
    """Sizes of a LlavaConfig's text model (head_dim may be set apart from hidden/heads)."""
    tc = config.text_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    return TextDims(tc.num_hidden_layers, tc.num_key_value_heads or tc.num_attention_heads,
                    head_dim, tc.hidden_size, tc.vocab_size)


def _dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class VisionEncoder(nn.Module):
    """pixel_values (B,3,H,W) -> image_features (B,N_img,D_text); equals get_image_features."""

    def __init__(self, model, scores: bool = False):
        super().__init__()
        cfg = model.config
        self.tower = part(model, "vision_tower")
        self.projector = part(model, "connector")
        layer = cfg.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.cls = has_cls_token(cfg.vision_config)
        self.scores = scores

    def forward(self, pixel_values: torch.Tensor):
        # Layers after the last selected one (and SigLIP's pooling head) do not reach the output,
        # so the ONNX exporter drops them from the graph.
        out = self.tower(pixel_values.to(_dtype(self.tower)), output_hidden_states=True,
                         output_attentions=self.scores, return_dict=True)
        hidden = [out.hidden_states[i] for i in self.layers]  # each (B, N_patch[+1], D_vis)
        if self.drop_cls:
            hidden = [h[:, 1:] for h in hidden]
        feats = hidden[0] if len(hidden) == 1 else torch.cat(hidden, dim=-1)
        feats = self.projector(feats).float()  # (B, N_img, D_text)
        if not self.scores:
            return feats
        # the attention of the layer whose output the projector reads (VisionZip: the
        # second-to-last, which is LLaVA's default vision_feature_layer)
        h = self.layers[0]
        layer = h if h < 0 else h - 1  # hidden_states[0] is the embeddings, before any layer
        return feats, visual_scores(out.attentions[layer], self.cls, self.drop_cls)


def visual_scores(attn: torch.Tensor, cls: bool, drop_cls: bool) -> torch.Tensor:
    """VisionZip's token scores from a layer's attention (B, heads, T, T): the attention CLS
    pays each token (CLIP), or, with no CLS (SigLIP), the attention each token receives averaged
    over every query; averaged over heads. (B, N_img), aligned with the image features."""
    attn = attn.float().mean(1)  # (B, T, T)
    if cls:
        row = attn[:, 0]  # (B, T): what CLS attends to, CLS itself first
        return row[:, 1:] if drop_cls else row
    return attn.mean(1)


class TiledVisionEncoder(nn.Module):
    """Idefics3 / SmolVLM: pixel_values (B, N, 3, S, S) and pixel_attention_mask (B, N, S, S)
    -> image_features (B·N, T, D_text), T = patches / scale_factor².

    Every tile is taken as a real, full one, as the processor makes them for one image per
    prompt (runtime/tiling.py): position ids are then 0..P-1 (what Idefics3VisionEmbeddings'
    bucketing gives a full tile), and the pixel mask becomes the encoder's key mask (all kept for
    a full tile). Padding tiles of a batch of several images are not dropped here."""

    def __init__(self, model):
        super().__init__()
        self.tower = part(model, "vision_tower")
        self.connector = part(model, "connector")
        self.patch = model.config.vision_config.patch_size

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        b, n, c, h, w = pixel_values.shape
        x = pixel_values.reshape(b * n, c, h, w).to(_dtype(self.tower))
        emb = self.tower.embeddings
        patches = emb.patch_embedding(x).flatten(2).transpose(1, 2)  # (BN, P, D_vis)
        positions = torch.arange(patches.shape[1], device=x.device)
        hidden = patches + emb.position_embedding(positions)[None]
        p = self.patch
        keep = pixel_attention_mask.reshape(b * n, h // p, p, w // p, p).to(torch.float32)
        keep = keep.amax(dim=(2, 4)).reshape(b * n, 1, 1, -1)  # (BN, 1, 1, P): 1 = attend
        mask = (1.0 - keep) * torch.finfo(hidden.dtype).min
        hidden = self.tower.encoder(inputs_embeds=hidden,
                                    attention_mask=mask.to(hidden.dtype)).last_hidden_state
        hidden = self.tower.post_layernorm(hidden)
        return self.connector(hidden).float()  # (BN, T, D_text)


class EmbedTokens(nn.Module):
    """input_ids (B,S) -> inputs_embeds (B,S,D)."""

    def __init__(self, model):
        super().__init__()
        self.embed = model.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed(input_ids).float()


class Decoder(nn.Module):
    """inputs_embeds, attention_mask, position_ids, flat past -> logits, flat presents.

    The flat past is `key_0, value_0, key_1, ...`, each (B, kv_heads, P, head_dim); P may be 0,
    so the same graph serves the prefill and every decode step.
    """

    def __init__(self, model):
        super().__init__()
        self.text = part(model, "language_model")
        self.lm_head = part(model, "lm_head")
        self.text_config = model.config.text_config

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        dtype = _dtype(self.text)
        assert len(past) == 2 * self.text_config.num_hidden_layers, "one key and value per layer"
        cache = DynamicCache(config=self.text_config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i].to(dtype), past[2 * i + 1].to(dtype), i)
        out = self.text(inputs_embeds=inputs_embeds.to(dtype), attention_mask=attention_mask,
                        position_ids=position_ids, past_key_values=cache, use_cache=True)
        logits = self.lm_head(out.last_hidden_state).float()  # (B, S, V)
        presents = []
        for layer in out.past_key_values.layers:  # each (B, kv_heads, P + S, head_dim)
            presents += [layer.keys.float(), layer.values.float()]
        return (logits, *presents)


def example_inputs(component: str, config, side: int | None = None) -> tuple:
    """Tracing inputs. Batch 2 and a non-empty past keep the tracer from baking in a size of 1
    or 0 as a constant; the real sizes are dynamic axes. `side`: the images the tower sees
    (backbones.input_side; the config's image_size when None)."""
    vc = config.vision_config
    s = side or getattr(vc, "image_size", None)  # None: a patch tower (its graph's own inputs)
    if component == "vision_encoder" and family_of(config).tiled:
        return (torch.randn(2, 3, vc.num_channels, s, s), torch.ones(2, 3, s, s, dtype=torch.bool))
    if component == "vision_encoder":
        return (torch.randn(2, vc.num_channels, s, s),)
    dims = text_dims(config)
    if component == "embed_tokens":
        return (torch.randint(0, dims.vocab_size, (2, 5)),)
    batch, seq, past = 2, 3, 2
    embeds = torch.randn(batch, seq, dims.hidden_size)
    mask = torch.ones(batch, past + seq, dtype=torch.long)
    positions = torch.arange(past, past + seq).expand(batch, seq).contiguous()
    if family_of(config).positions == "mrope":  # the three streams, here equal (text)
        positions = positions.expand(3, batch, seq).contiguous()
    cache = [torch.randn(batch, dims.num_kv_heads, past, dims.head_dim)
             for _ in range(2 * dims.num_layers)]
    return (embeds, mask, positions, *cache)


def wrapper(component: str, model, scores: bool = False) -> nn.Module:
    """The export module of one component (shares the model's weights). `scores`: the LLaVA
    vision graph also outputs VisionZip's token scores."""
    if component == "vision_encoder":
        family = family_of(model)
        if family.vision_graph is not None:
            return family.vision_graph(model).eval()
        return (TiledVisionEncoder(model) if family.tiled else VisionEncoder(model, scores)).eval()
    if component == "embed_tokens":
        return EmbedTokens(model).eval()
    assert component == "decoder_model_merged", f"unknown component {component}"
    return Decoder(model).eval()
