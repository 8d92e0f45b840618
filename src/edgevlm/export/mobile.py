"""The mobile profile's graphs: static shapes, and only ops that NNAPI and CoreML take whole.

A phone NPU runs a graph only as far as its provider lists every op and every shape is fixed
(onnxruntime's tools/mobile_helpers tables; see edgevlm.export.readiness). The default graphs
compute the causal mask and rotary tables from Range/Equal/Where/Cos, repeat KV heads with
Expand, grow the cache with Shape arithmetic, and use LayerNormalization and Erf. The modules
here write the same math (transformers' eager LLaVA / SigLIP / CLIP / Llama / Qwen2 forward)
with fixed sizes and plain ops instead:
  * batch 1, a fixed image size (for Idefics3 / SmolVLM, one tile: the global image, so the
    export's image recipe has splitting off), a fixed step of `step` tokens per decoder pass and
    a cache of `context` slots. The decoder returns only the step's new keys and values; the runtime
    writes them into its cache at their positions (edgevlm.runtime.static);
  * the attention mask (additive, float) and the rotary cos/sin come in as inputs; the
    exporter writes the cos/sin table for positions 0..context-1 from the model's own rotary
    module (contract.ROPE_FILE), so every RoPE variant is exact;
  * grouped-query attention by reshaping queries into (kv_heads, group*step) rows, not by
    repeating keys; rotate_half as Slice, Mul(-1), Concat;
  * LayerNorm and RMSNorm in float32 with the mean as a MatMul by a constant 1/D column
    (CoreML NeuralNetwork has no ReduceMean); GELU in tanh form (NNAPI and CoreML
    NeuralNetwork have no Erf): exact for SigLIP's gelu_pytorch_tanh, an approximation
    (max error 5e-4 on a unit input) for an erf GELU, which validation covers.
Weights are the model's own parameters (no copies), under their Hugging Face names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from edgevlm.errors import UserError
from edgevlm.families import family_of, part

ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "silu", "relu")
DEFAULT_CONTEXT = 1024  # cache slots when --max-context is not given (capped by the model's)


@dataclass(frozen=True)
class StaticShapes:
    image_size: int
    context: int  # positions the cache holds: prompt (with image tokens) + answer
    step: int  # tokens per decoder pass
    tiles: int | None = None  # tiles per image (a tiled family's vision encoder), else None

    def to_dict(self) -> dict:
        out = {"batch": 1, "image_size": self.image_size, "context": self.context,
               "step": self.step}
        return out if self.tiles is None else {**out, "tiles": self.tiles}


def static_shapes(config, max_context: int | None, step: int = 1,
                  side: int | None = None) -> StaticShapes:
    """The mobile graphs' fixed shapes; `side`: the images the tower sees (backbones.input_side;
    the config's image_size when None)."""
    limit = config.text_config.max_position_embeddings
    context = max_context or min(limit, DEFAULT_CONTEXT)
    if not 1 <= context <= limit:
        raise UserError(f"--max-context {context} must be between 1 and the model's "
                        f"max_position_embeddings {limit}")
    tiles = 1 if family_of(config).tiled else None  # the global image only
    return StaticShapes(side or config.vision_config.image_size, context, step, tiles)


def check_supported(model) -> None:
    """UserError naming what the mobile graphs cannot express for this model, if anything."""
    cfg = model.config
    problems = []
    acts = [("vision_config.hidden_act", cfg.vision_config.hidden_act),
            ("text_config.hidden_act", cfg.text_config.hidden_act)]
    if hasattr(cfg, "projector_hidden_act"):  # LLaVA's MLP projector (Idefics3's is one Linear)
        acts.append(("projector_hidden_act", cfg.projector_hidden_act))
    for where, act in acts:
        if act not in ACTIVATIONS:
            problems.append(f"{where}={act!r} (supported: {', '.join(ACTIVATIONS)})")
    attn = part(model, "language_model").layers[0].self_attn
    if getattr(cfg.vision_config, "use_swiglu_ffn", False):
        problems.append("vision_config.use_swiglu_ffn (DINOv2-giant's SwiGLU MLP)")
    for name in ("q_norm", "k_norm"):
        if hasattr(attn, name):
            problems.append(f"{cfg.text_config.model_type} attention has {name}")
    if getattr(cfg.text_config, "sliding_window", None) and getattr(
            cfg.text_config, "use_sliding_window", False):
        problems.append("sliding-window attention")
    if problems:
        raise UserError("--profile mobile cannot express this model: " + "; ".join(problems) +
                        "; export it with --profile default")


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    if name in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        inner = math.sqrt(2 / math.pi) * (x + 0.044715 * (x * x * x))
        return 0.5 * x * (1.0 + torch.tanh(inner))
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return x * torch.sigmoid(x)
    return torch.relu(x)


def _mean_last(x: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis as a MatMul by a 1/D column: (..., D) -> (..., 1)."""
    d = x.shape[-1]
    return x @ torch.full((d, 1), 1.0 / d, dtype=x.dtype)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h - _mean_last(h)
    h = h / torch.sqrt(_mean_last(h * h) + ln.eps)
    return (h * ln.weight.float() + ln.bias.float()).to(x.dtype)


def _rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h / torch.sqrt(_mean_last(h * h) + norm.variance_epsilon)
    return norm.weight * h.to(x.dtype)


def _vision_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """CLIP / SigLIP / Idefics3 / DINOv2 vision self-attention over all N positions of one
    image (DINOv2 names its heads, scale and output projection differently)."""
    n, d = x.shape[1], x.shape[2]  # static: Python ints at trace time
    heads, hd = getattr(attn, "num_heads", None) or attn.num_attention_heads, attn.head_dim
    scale = getattr(attn, "scale", None) or attn.scaling
    out_proj = getattr(attn, "out_proj", None) or attn.o_proj

    def split(t):  # (1, N, D) -> (1, heads, N, hd)
        return t.reshape(1, n, heads, hd).transpose(1, 2)

    q, k, v = split(attn.q_proj(x)), split(attn.k_proj(x)), split(attn.v_proj(x))
    scores = (q @ k.transpose(2, 3)) * scale
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = (probs @ v).transpose(1, 2).reshape(1, n, d)
    return out_proj(out)


def _vision_layer(layer, act: str, x: torch.Tensor) -> torch.Tensor:
    """One pre-norm vision transformer layer (layer_norm1, self_attn, layer_norm2, mlp); in
    DINOv2 (norm1, attention, norm2, mlp) LayerScale multiplies each block's output per
    channel."""
    if hasattr(layer, "layer_scale1"):  # DINOv2
        x = x + _vision_attention(layer.attention, _layer_norm(layer.norm1, x)) * \
            layer.layer_scale1.lambda1
        h = _layer_norm(layer.norm2, x)
        return x + layer.mlp.fc2(_act(act, layer.mlp.fc1(h))) * layer.layer_scale2.lambda1
    x = x + _vision_attention(layer.self_attn, _layer_norm(layer.layer_norm1, x))
    h = _layer_norm(layer.layer_norm2, x)
    return x + layer.mlp.fc2(_act(act, layer.mlp.fc1(h)))


class StaticVisionEncoder(nn.Module):
    """pixel_values (1,3,S,S) -> image_features (1,N_img,D_text), as graphs.VisionEncoder.
    `side`: S, the static image side (DINOv2's positions are interpolated to it here, once)."""

    def __init__(self, model, side: int | None = None):
        super().__init__()
        cfg = model.config
        self.tower = part(model, "vision_tower")
        self.projector = part(model, "connector")
        self.vc, self.proj_act = cfg.vision_config, cfg.projector_hidden_act
        layer = cfg.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        emb = self.tower.embeddings
        self.dinov2 = hasattr(emb, "patch_embeddings")
        if self.dinov2:  # the bicubic grid resize as a table (no Resize node): (1, 1+N, D_vis)
            side = side or self.vc.image_size
            n = (side // self.vc.patch_size) ** 2 + 1
            with torch.no_grad():
                table = emb.interpolate_pos_encoding(
                    emb.cls_token.new_zeros(1, n, emb.cls_token.shape[-1]), side, side)
            self.register_buffer("dinov2_positions", table.detach().clone(), persistent=False)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) -> (1, [1 +] N_patch, D_vis): patches, class token, positions."""
        emb = self.tower.embeddings
        conv = emb.patch_embeddings.projection if self.dinov2 else emb.patch_embedding
        x = conv(pixel_values.to(conv.weight.dtype))  # (1, D_vis, g, g)
        d = x.shape[1]
        x = x.reshape(1, d, -1).transpose(1, 2)  # (1, N_patch, D_vis)
        if self.dinov2:
            return torch.cat([emb.cls_token, x], dim=1) + self.dinov2_positions
        if hasattr(emb, "class_embedding"):  # CLIP: a class token first
            x = torch.cat([emb.class_embedding.reshape(1, 1, d), x], dim=1)
        return x + emb.position_embedding.weight[None]  # position ids are 0..N-1: no Gather

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self._embed(pixel_values)
        if hasattr(self.tower, "pre_layrnorm"):
            x = _layer_norm(self.tower.pre_layrnorm, x)
        hidden = [x]
        blocks = self.tower.encoder.layer if self.dinov2 else self.tower.encoder.layers
        last = max(i % (len(blocks) + 1) for i in self.layers)
        for layer in blocks[:last]:
            x = _vision_layer(layer, self.vc.hidden_act, x)
            hidden.append(x)
        total = len(blocks) + 1
        feats = [hidden[i % total] for i in self.layers]
        if self.drop_cls:
            feats = [h[:, 1:] for h in feats]
        x = feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)
        x = self.projector.linear_2(_act(self.proj_act, self.projector.linear_1(x)))
        return x.float()  # (1, N_img, D_text)


class StaticTiledVisionEncoder(nn.Module):
    """Idefics3 / SmolVLM at one tile: pixel_values (1,1,3,S,S) and pixel_attention_mask
    (1,1,S,S) -> image_features (1,T,D_text), as graphs.TiledVisionEncoder for a full tile.

    The tile is the global image, always full (splitting is off in a mobile export's recipe), so
    position ids are 0..P-1 and no key is masked; the pixel mask only zeroes padding pixels,
    which a full tile has none of. Pixel shuffle is written with the config's sizes."""

    def __init__(self, model):
        super().__init__()
        cfg = model.config
        self.tower = part(model, "vision_tower")
        self.connector = part(model, "connector")
        self.act = cfg.vision_config.hidden_act
        self.grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.scale = cfg.scale_factor

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor):
        emb = self.tower.embeddings
        dtype = emb.patch_embedding.weight.dtype
        keep = pixel_attention_mask.to(dtype)  # (1, 1, S, S): the one tile's pixels
        x = emb.patch_embedding(pixel_values[:, 0].to(dtype) * keep)  # (1, D_vis, g, g)
        d, g, s = x.shape[1], self.grid, self.scale
        x = x.reshape(1, d, g * g).transpose(1, 2)  # (1, P, D_vis)
        x = x + emb.position_embedding.weight[None]  # a full tile: position ids 0..P-1
        for layer in self.tower.encoder.layers:
            x = _vision_layer(layer, self.act, x)
        x = _layer_norm(self.tower.post_layernorm, x)
        # Idefics3Connector.pixel_shuffle at fixed sizes: (1, g·g, d) -> (1, g·g/s², d·s²)
        x = x.reshape(1, g, g // s, d * s).transpose(1, 2)
        x = x.reshape(1, g // s, g // s, d * s * s).transpose(1, 2)
        x = x.reshape(1, (g // s) ** 2, d * s * s)
        return self.connector.modality_projection(x).float()  # (1, T, D_text)


class StaticDecoder(nn.Module):
    """One pass of `step` tokens over a fixed cache of `context` slots.

    inputs_embeds (1,K,D), attention_mask (1,1,K,C+K) additive float, rope_cos/rope_sin (1,K,hd),
    past_key_values.{i}.key|value (1,kv,C,hd) -> logits (1,K,V), present.{i}.key|value
    (1,kv,K,hd): the keys and values of the K new tokens only.
    """

    def __init__(self, model):
        super().__init__()
        self.text = part(model, "language_model")
        self.lm_head = part(model, "lm_head")
        self.act = model.config.text_config.hidden_act

    def _attention(self, attn, x, mask, cos, sin, past_k, past_v):
        k_len = x.shape[1]
        hd = attn.head_dim
        kv = attn.k_proj.out_features // hd
        heads = attn.q_proj.out_features // hd
        group = heads // kv

        def rope(t):  # (1, h, K, hd); rotate_half without Neg
            half = hd // 2
            rotated = torch.cat([t[..., half:] * -1.0, t[..., :half]], dim=-1)
            return t * cos + rotated * sin

        q = rope(attn.q_proj(x).reshape(1, k_len, heads, hd).transpose(1, 2))
        k = rope(attn.k_proj(x).reshape(1, k_len, kv, hd).transpose(1, 2))
        v = attn.v_proj(x).reshape(1, k_len, kv, hd).transpose(1, 2)
        keys = torch.cat([past_k.to(x.dtype), k], dim=2)  # (1, kv, C+K, hd)
        values = torch.cat([past_v.to(x.dtype), v], dim=2)
        total = keys.shape[2]
        # Query heads that share a KV head become rows of one (kv, group*K, hd) block.
        scores = (q.reshape(1, kv, group * k_len, hd) @ keys.transpose(2, 3)) * attn.scaling
        scores = scores.reshape(1, heads, k_len, total).float() + mask
        probs = torch.softmax(scores, dim=-1).to(x.dtype).reshape(1, kv, group * k_len, total)
        out = (probs @ values).reshape(1, heads, k_len, hd).transpose(1, 2)
        return attn.o_proj(out.reshape(1, k_len, heads * hd)), k, v

    def forward(self, inputs_embeds, attention_mask, rope_cos, rope_sin, *past):
        dtype = self.lm_head.weight.dtype
        x = inputs_embeds.to(dtype)
        shape = (1, 1, *rope_cos.shape[1:])  # (1, 1, K, hd); a Reshape, as CoreML NN has no
        cos, sin = rope_cos.to(dtype).reshape(shape), rope_sin.to(dtype).reshape(shape)  # Unsqueeze
        presents = []
        for i, layer in enumerate(self.text.layers):
            out, k, v = self._attention(layer.self_attn, _rms_norm(layer.input_layernorm, x),
                                        attention_mask, cos, sin, past[2 * i], past[2 * i + 1])
            x = x + out
            h = _rms_norm(layer.post_attention_layernorm, x)
            mlp = layer.mlp
            x = x + mlp.down_proj(_act(self.act, mlp.gate_proj(h)) * mlp.up_proj(h))
            presents += [k.float(), v.float()]
        logits = self.lm_head(_rms_norm(self.text.norm, x)).float()  # (1, K, V)
        return (logits, *presents)


def rope_table(model, context: int):
    """(2, context, head_dim) float32: the model's rotary cos and sin for positions 0..C-1."""
    from edgevlm.export.graphs import text_dims

    dims = text_dims(model.config)
    rotary = part(model, "language_model").rotary_emb
    x = torch.zeros(1, 1, dims.head_dim, dtype=torch.float32)
    with torch.no_grad():
        cos, sin = rotary(x, torch.arange(context)[None])
    return torch.stack([cos[0], sin[0]]).float().numpy()


def example_inputs(component: str, config, shapes: StaticShapes) -> tuple:
    from edgevlm.export.graphs import text_dims

    vc = config.vision_config
    if component == "vision_encoder" and shapes.tiles is not None:
        size = (shapes.image_size, shapes.image_size)
        return (torch.randn(1, shapes.tiles, vc.num_channels, *size),
                torch.ones(1, shapes.tiles, *size, dtype=torch.bool))
    if component == "vision_encoder":
        return (torch.randn(1, vc.num_channels, shapes.image_size, shapes.image_size),)
    dims = text_dims(config)
    k, c = shapes.step, shapes.context
    if component == "embed_tokens":
        return (torch.randint(0, dims.vocab_size, (1, k)),)
    cache = [torch.randn(1, dims.num_kv_heads, c, dims.head_dim)
             for _ in range(2 * dims.num_layers)]
    return (torch.randn(1, k, dims.hidden_size), torch.zeros(1, 1, k, c + k),
            torch.randn(1, k, dims.head_dim), torch.randn(1, k, dims.head_dim), *cache)


def wrapper(component: str, model, shapes: StaticShapes | None = None) -> nn.Module:
    from edgevlm.export.graphs import EmbedTokens

    if component == "vision_encoder" and family_of(model).tiled:
        return StaticTiledVisionEncoder(model).eval()
    if component == "vision_encoder":
        return StaticVisionEncoder(model, shapes.image_size if shapes else None).eval()
    if component == "embed_tokens":
        return EmbedTokens(model).eval()
    assert component == "decoder_model_merged", f"unknown component {component}"
    return StaticDecoder(model).eval()
