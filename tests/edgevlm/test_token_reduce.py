"""Training at a reduced visual token count (edgevlm.models.token_reduce): the model records it,
loads with it, exports with it, and its export answers as the torch model does."""

from __future__ import annotations

import json

import pytest

from edgevlm.errors import UserError


@pytest.fixture(scope="module")
def reduced(micro_model_dir, shapes_dir, tmp_path_factory):
    from edgevlm.data import load_samples
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig, run

    out = tmp_path_factory.mktemp("reduced") / "model"
    run(load_model(micro_model_dir), load_samples(shapes_dir / "train.json"), out,
        TrainConfig(steps=20, batch_size=8, warmup=2, visual_tokens=4), quiet=True)
    return out


def test_the_trained_model_keeps_its_token_count(reduced, shapes_dir):
    from edgevlm.data import Collator, load_samples
    from edgevlm.models import load_model

    config = json.loads((reduced / "config.json").read_text())
    assert config["edgevlm_visual_tokens"] == {"method": "divprune", "tokens": 4,
                                               "full_tokens": 9}
    loaded = load_model(reduced)
    assert loaded.num_image_tokens == 4
    sample = load_samples(shapes_dir / "eval.json")[0]
    batch = Collator(loaded.processor, loaded.num_image_tokens)([sample])
    assert int((batch["input_ids"] == loaded.image_token_id).sum()) == 4
    out = loaded.model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[1] == batch["input_ids"].shape[1]
    assert load_model(reduced, reduce_tokens=False).num_image_tokens == 9


def test_its_export_selects_alike_and_answers_as_torch(reduced, shapes_dir, tmp_path):
    from edgevlm.data import load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.export import ExportConfig, export
    from edgevlm.models import load_model
    from edgevlm.runtime import VLM

    export(reduced, tmp_path / "e", ExportConfig(precision="fp32"))
    manifest = json.loads((tmp_path / "e" / "edgevlm.json").read_text())
    assert manifest["token_select"] == {"method": "divprune", "tokens": 4}
    samples = load_samples(shapes_dir / "eval.json")[:8]
    want = generate_answers(load_model(reduced), samples, max_new_tokens=4, tokens=True)
    vlm = VLM.load(tmp_path / "e", provider="cpu")
    got = [list(vlm.generate(str(s.image), s.turns[-1][0].replace("<image>\n", ""),
                             max_new_tokens=4).token_ids) for s in samples]
    assert got == want
    with pytest.raises(UserError, match="was trained at 4 visual tokens"):
        export(reduced, tmp_path / "e2",
               ExportConfig(precision="fp32", visual_tokens=2, token_select="divprune"))


def test_settings_that_cannot_train_are_named(reduced, micro_model_dir, shapes_dir, tmp_path):
    from edgevlm.data import load_samples
    from edgevlm.models import load_model
    from edgevlm.train import TrainConfig, run

    samples = load_samples(shapes_dir / "train.json")
    with pytest.raises(UserError, match="--token-select visionzip cannot train"):
        run(load_model(micro_model_dir), samples, tmp_path / "a",
            TrainConfig(steps=1, visual_tokens=4, token_select="visionzip"), quiet=True)
    with pytest.raises(UserError, match="--visual-tokens 12 must be between 1 and the tower's 9"):
        run(load_model(micro_model_dir), samples, tmp_path / "b",
            TrainConfig(steps=1, visual_tokens=12), quiet=True)
    with pytest.raises(UserError, match="the model was trained at 4 visual tokens"):
        run(load_model(reduced), samples, tmp_path / "c",
            TrainConfig(steps=1, visual_tokens=2), quiet=True)
    assert not any((tmp_path / n).exists() for n in "abc")
