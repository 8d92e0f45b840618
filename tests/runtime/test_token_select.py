"""Visual token reduction (issue 19): DivPrune's max-min diversity and VisionZip's dominant +
contextual tokens in the runtime's numpy, the export flags, the vision graph's attention
scores against torch's, and the one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime.token_select import divprune, select, visionzip


def test_divprune_picks_diverse_tokens_in_image_order():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 16))
    feats = np.concatenate([base, base + 1e-3 * rng.normal(size=(4, 16))])  # 4 near-copies
    picked = divprune(feats, 4)
    assert list(picked) == sorted(picked)
    assert len({i % 4 for i in picked}) == 4  # one of each pair, never both copies
    assert list(divprune(feats, 8)) == list(range(8))


def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(64, 8)).astype(np.float32)
    scores = rng.random(64)
    out = visionzip(feats, scores, 16)  # 14 dominant + 2 contextual (VisionZip's 54:10 split)
    dominant = np.sort(np.argsort(-scores)[:14])
    assert out.shape == (16, 8)
    assert np.array_equal(out[:14], feats[dominant])
    # the two contextual tokens: the 50 others, each averaged into the nearer (cosine) of two
    # evenly spaced targets among them
    rest = np.setdiff1d(np.arange(64), dominant)
    targets = rest[[0, 49]]
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    owner = np.argmax(unit[rest] @ unit[targets].T, axis=1)
    for k in range(2):
        assert np.allclose(out[14 + k], feats[rest[owner == k]].mean(0), atol=1e-6)
    assert np.allclose(visionzip(feats, scores, 1), feats[[int(np.argmax(scores))]])
    assert np.array_equal(visionzip(feats, scores, 64), feats)  # all kept: image order
    with pytest.raises(UserError, match="--visual-tokens 65 must be between 1 and the tower's "
                                        "64 image tokens"):
        select("divprune", feats, 65)


@pytest.fixture(scope="module")
def exports(micro_model_dir, tmp_path_factory):
    from edgevlm.export import ExportConfig, export

    root = tmp_path_factory.mktemp("tokens")
    out = {}
    for method in ("divprune", "visionzip"):
        out[method] = root / method
        export(micro_model_dir, out[method],
               ExportConfig(precision="fp32", visual_tokens=4, token_select=method))
    return out


@pytest.mark.parametrize("method", ["divprune", "visionzip"])
def test_an_export_with_fewer_visual_tokens_answers(method, exports, eval_samples):
    from edgevlm.runtime import VLM

    manifest = json.loads((exports[method] / "edgevlm.json").read_text())
    assert manifest["num_image_tokens"] == 4 and manifest["vision_tokens"] == 9
    assert manifest["token_select"] == {"method": method, "tokens": 4}
    vlm = VLM.load(exports[method], provider="cpu")
    full_prompt = vlm.generate(str(eval_samples[0].image), "What color is the circle?",
                               max_new_tokens=2)
    ids = vlm._prepare(str(eval_samples[0].image), "What color is the circle?", 0.0).ids
    assert int((ids == vlm.image_token_id).sum()) == 4
    assert full_prompt.timings.n_prompt_tokens == len(ids)


def test_the_graphs_scores_are_torchs_attention(exports, micro_model_dir):
    """The visionzip graph's visual_scores equal the attention each token receives in the layer
    the projector reads (the micro tower's only one; SigLIP: no CLS), averaged over heads and
    queries, computed in torch."""
    import onnxruntime as ort
    import torch

    from edgevlm.models import load_model

    model = load_model(micro_model_dir).model
    model.set_attn_implementation("eager")
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        attn = model.model.vision_tower(pixels, output_attentions=True).attentions[-1]
    want = attn.mean(1).mean(1).numpy()  # (2, 9)
    manifest = json.loads((exports["visionzip"] / "edgevlm.json").read_text())
    graph = exports["visionzip"] / manifest["components"]["vision_encoder"]["file"]
    session = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    got = session.run(["visual_scores"], {"pixel_values": pixels.numpy()})[0]
    assert np.abs(got - want).max() < 1e-5


@pytest.mark.parametrize("args, message", [
    (dict(visual_tokens=4), "--visual-tokens N and --token-select METHOD go together"),
    (dict(visual_tokens=0, token_select="divprune"), "--visual-tokens 0 must be at least 1"),
    (dict(visual_tokens=4, token_select="fastv"), "--token-select 'fastv' is unknown; choose "
                                                   "one of divprune, visionzip"),
    (dict(visual_tokens=4, token_select="visionzip", profile="mobile"),
     "--token-select visionzip needs the default profile's vision graph"),
])
def test_bad_token_settings_are_named(args, message):
    from edgevlm.export import ExportConfig

    with pytest.raises(UserError, match=message):
        ExportConfig(**({"precision": "fp32"} if "profile" not in args else {}), **args)


def test_more_tokens_than_the_tower_has_is_refused(micro_model_dir, tmp_path):
    from edgevlm.export import ExportConfig, export

    with pytest.raises(UserError, match="--visual-tokens 10 must be between 1 and the tower's "
                                        "9 image tokens"):
        export(micro_model_dir, tmp_path / "e",
               ExportConfig(precision="fp32", visual_tokens=10, token_select="divprune"))
    assert not (tmp_path / "e").exists()
