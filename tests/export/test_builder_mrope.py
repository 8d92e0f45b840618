"""The decoder builder on Qwen2-VL / Qwen2.5-VL text decoders (M-RoPE): the graph takes
position_ids (3, B, S) and equals transformers' language model with the same three-stream
positions, through a prefill over an image grid and decode steps after it, at fp32 and int4; an
ordinary RoPE decoder's graph is unchanged."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgevlm.export.builder import linear
from edgevlm.export.builder.linear import Linears
from edgevlm.export.builder.model import build_decoder
from edgevlm.export.builder.mrope import LAYOUTS, POSITION_IDS
from edgevlm.export.builder.spec import text_spec, unsupported
from edgevlm.runtime import contract
from edgevlm.runtime.contract import Activations
from edgevlm.runtime.kv_buffer import SharedKV

# head_dim 128 / 4 = 32: mrope_section [4, 6, 6] covers its 16 frequencies (hidden_size 64 would
# give head_dim 16, 8 frequencies).
TEXT = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=300, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, pad_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [4, 6, 6]})
CONTEXT = 64
DECODE_STEPS = 5


class TextDecoder(nn.Module):
    """What the builder reads of a model (edgevlm.export.graphs.Decoder's attributes), without
    a registered family."""

    def __init__(self, text, lm_head, text_config):
        super().__init__()
        self.text, self.lm_head, self.text_config = text, lm_head, text_config


def _qwen2_vl(kind: str) -> TextDecoder:
    torch.manual_seed(0)
    if kind == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        config = Qwen2VLConfig(text_config=TEXT, vision_config=dict(
            depth=1, embed_dim=32, num_heads=2, hidden_size=128))
        model = Qwen2VLForConditionalGeneration(config)
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        config = Qwen2_5_VLConfig(text_config=TEXT, vision_config=dict(
            depth=1, hidden_size=32, num_heads=2, out_hidden_size=128, intermediate_size=64))
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    return TextDecoder(model.model.language_model, model.lm_head, config.text_config)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def decoder(request) -> TextDecoder:
    return _qwen2_vl(request.param)


def _grid_positions() -> np.ndarray:
    """(3, 1, S + DECODE_STEPS): 3 text tokens, a 1 x 3 x 4 image grid, 4 text tokens, then
    the decode steps, as Qwen2-VL's get_rope_index numbers them (the positions run behind the
    token index after the image)."""
    text = [np.full((3, 3), np.arange(3))]
    t, h, w = np.meshgrid(np.arange(1), np.arange(3), np.arange(4), indexing="ij")
    text.append(3 + np.stack([t.ravel(), h.ravel(), w.ravel()]))
    after = 3 + 4  # max image position + 1
    text.append(np.full((3, 4 + DECODE_STEPS), np.arange(after, after + 4 + DECODE_STEPS)))
    return np.concatenate(text, axis=1)[:, None].astype(np.int64)


def _reference(decoder: TextDecoder, embeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """transformers' logits (1, N, V) for the whole sequence in one pass."""
    with torch.no_grad():
        out = decoder.text(inputs_embeds=torch.from_numpy(embeds),
                           position_ids=torch.from_numpy(positions))
        return decoder.lm_head(out.last_hidden_state).float().numpy()


def _build(decoder: TextDecoder, path, layout: str = "gqa", linears: Linears | None = None):
    built = build_decoder(decoder, path, "fp32", CONTEXT, linears or Linears(np.dtype(np.float32)),
                          Activations.FP32, mrope_layout=layout)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return built, SharedKV(session, built.spec.num_layers)


def _run(kv: SharedKV, embeds: np.ndarray, positions: np.ndarray, prefill: int) -> np.ndarray:
    """Graph logits (N - prefill + 1, V): the prefill's last position, then one per decode
    step, each step feeding the next token's embedding at its own position."""
    cache = kv.new_cache(CONTEXT)
    rows = [kv.decode(embeds[:, :prefill], 0, cache, positions[:, :, :prefill])[0, 0]]
    for i in range(prefill, embeds.shape[1]):
        rows.append(kv.decode(embeds[:, i:i + 1], i, cache, positions[:, :, i:i + 1])[0, 0])
    return np.stack(rows)


def _inputs(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, n, TEXT["hidden_size"])).astype(
        np.float32)


def test_spec_reads_the_sections(decoder):
    spec = text_spec(decoder.text_config)
    assert spec.mrope_section == (4, 6, 6) and sum(spec.mrope_section) == spec.head_dim // 2
    assert spec.attention_bias and spec.head_dim == 32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_graph_equals_transformers_over_an_image_grid(decoder, tmp_path, layout):
    positions = _grid_positions()
    n = positions.shape[2]
    prefill = n - DECODE_STEPS
    assert not np.array_equal(positions[0], positions[1])  # three different streams
    embeds = _inputs(n)
    built, kv = _build(decoder, tmp_path / "decoder.onnx", layout)
    graph = onnx.load(str(built.path), load_external_data=False).graph
    pos = next(i for i in graph.input if i.name == POSITION_IDS)
    dims = [d.dim_value or d.dim_param for d in pos.type.tensor_type.shape.dim]
    assert dims == [3, "batch_size", "sequence_length"]
    assert pos.type.tensor_type.elem_type == onnx.TensorProto.INT64
    want = _reference(decoder, embeds, positions)[0, prefill - 1:]
    error = np.abs(_run(kv, embeds, positions, prefill) - want).max()
    assert error <= 1e-4
    # the streams matter: ordinary positions miss by far more (small at random init's 0.02 std)
    flat = np.broadcast_to(np.arange(n), (3, 1, n)).copy()
    off = np.abs(_run(kv, embeds, flat, prefill) - want).max()
    assert off > 50 * error


def test_rotary_layout_is_exact_at_batch_two(decoder, tmp_path):
    """RotaryEmbedding indexes every token; one plain session.run over two rows with their own
    positions equals transformers row by row."""
    built, kv = _build(decoder, tmp_path / "decoder.onnx", "rotary")
    positions = _grid_positions()[:, :, :10]
    batch = np.concatenate([positions, positions[:, :, ::-1] + 1], axis=1)  # (3, 2, 10)
    embeds = np.random.default_rng(1).standard_normal((2, 10, 128)).astype(np.float32)
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((2, 10), np.int64),
            POSITION_IDS: batch}
    zeros = np.zeros((2, 2, CONTEXT, 32), np.float32)
    feed.update({name: zeros for name in contract.past_names(2)})
    logits = kv.session.run(["logits"], feed)[0]  # (2, 1, V)
    for b in range(2):
        want = _reference(decoder, embeds[b:b + 1], batch[:, b:b + 1])[0, -1]
        assert np.abs(logits[b, 0] - want).max() <= 1e-4


def test_int4_equals_torch_carrying_its_integers(tmp_path):
    """MatMulNBits is independent of the rotary: the int4 graph (accuracy_level 0) equals the
    torch model holding the very integers it holds."""
    decoder = _qwen2_vl("qwen2_vl")
    weights, rounded = linear.plan(decoder, "int4", 32, None)
    assert len(weights) == 15  # q, k, v, o, gate, up, down of 2 layers, and the LM head
    linear.carry(decoder, weights, rounded)
    linears = Linears(np.dtype(np.float32), weights, accuracy_level=0)
    built, kv = _build(decoder, tmp_path / "decoder_q4.onnx", linears=linears)
    ops = {n.op_type for n in onnx.load(str(built.path), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    positions = _grid_positions()
    n = positions.shape[2]
    embeds = _inputs(n)
    want = _reference(decoder, embeds, positions)[0, n - DECODE_STEPS - 1:]
    got = _run(kv, embeds, positions, n - DECODE_STEPS)
    assert np.abs(got - want).max() <= 1e-4


def test_decode_without_positions_is_named(decoder, tmp_path):
    _, kv = _build(decoder, tmp_path / "decoder.onnx")
    with pytest.raises(ValueError, match="M-RoPE .* pass decode\\(\\.\\.\\., positions=\\)"):
        kv.decode(_inputs(3), 0, kv.new_cache(CONTEXT))
    with pytest.raises(ValueError, match=r"shape \(3, 1, 3\)"):
        kv.decode(_inputs(3), 0, kv.new_cache(CONTEXT), np.zeros((1, 3), np.int64))


def test_rope_decoder_graph_is_unchanged(tmp_path):
    """A Qwen2 decoder keeps the contract's IO (no position_ids) and GroupQueryAttention's own
    rotary over the static caches; SharedKV.decode without positions still runs it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in TEXT.items() if k != "rope_parameters"}
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    decoder = TextDecoder(model.model, model.lm_head, model.config)
    built, kv = _build(decoder, tmp_path / "decoder.onnx")
    graph = onnx.load(str(built.path), load_external_data=False).graph
    assert [i.name for i in graph.input] == list(contract.builder_decoder_io(2).inputs)
    assert not any(n.name.startswith("/model/mrope") for n in graph.node)
    assert built.nodes == 34 and built.spec.mrope_section is None
    gqa = next(n for n in graph.node if n.op_type == "GroupQueryAttention")
    assert list(gqa.input[7:]) == ["cos_cache", "sin_cache"]
    embeds = _inputs(6)
    with torch.no_grad():
        want = model(inputs_embeds=torch.from_numpy(embeds)).logits[0, -1].numpy()
    got = kv.decode(embeds, 0, kv.new_cache(CONTEXT))[0, 0]
    assert np.abs(got - want).max() <= 1e-4


def test_bad_sections_are_refused():
    from transformers import Qwen2VLConfig

    bad = Qwen2VLConfig(text_config={**TEXT, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 4]}}).text_config
    assert unsupported(bad) == ("rope_parameters mrope_section [4, 6, 4] must be positive and "
                                "sum to head_dim / 2 = 16")
