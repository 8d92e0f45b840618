"""--resume continues the run it was started as, or says in one line why not (issue 33): a
resume with other settings that change the math or the data order (batch size, lr, steps, stage,
the data, a distillation stage's loss weights) is refused naming each one as old -> new, and a
checkpoint that does not fit (another stage, saved before settings were recorded) is one line,
not accelerate's ValueError. Settings that only say when to checkpoint may change."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from edgevlm import train
from edgevlm.data import load_samples
from edgevlm.errors import UserError
from edgevlm.models import load_model
from edgevlm.train import RESUME_SETTINGS, TrainConfig
from tests.reliability.test_outputs import run
from tests.tools import without_notes

CFG = TrainConfig(stage="sft", steps=6, batch_size=4, lr=3e-3, warmup=2, save_every=2)
KILL_AT = 5  # the kill lands in step 5, after the step-4 checkpoint


class Killed(Exception):
    pass


def killing(loss_fn):
    """loss_fn that raises at call KILL_AT, as a SIGKILL would stop the run there."""
    calls = []

    def loss(*args):
        calls.append(1)
        if len(calls) == KILL_AT:
            raise Killed
        return loss_fn(*args)
    return loss


@pytest.fixture(scope="module")
def killed(tmp_path_factory, micro_model_dir, shapes_dir):
    """The work folder of a train run killed in step 5 (checkpoints step_2, step_4)."""
    root = tmp_path_factory.mktemp("killed")
    with pytest.raises(Killed):
        train.run(load_model(micro_model_dir), load_samples(shapes_dir / "train.json"),
                  root / "o", CFG, loss_fn=killing(train.ce_loss), quiet=True)
    return root / ".o.work"


@pytest.fixture
def out(killed, tmp_path):
    """OUT whose work folder holds a copy of the killed run's checkpoints."""
    shutil.copytree(killed, tmp_path / ".o.work")
    return tmp_path / "o"


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in (out.parent / f".{out.name}.work" / "checkpoints").iterdir())


def resume(micro_model_dir, samples, out, cfg):
    return train.run(load_model(micro_model_dir), samples, out, cfg, resume=True, quiet=True)


@pytest.mark.parametrize("change, named", [
    (dict(batch_size=8, lr=1e-3, steps=8), "--batch-size 4 -> 8; --lr 0.003 -> 0.001; "
                                           "--steps 6 -> 8"),
    (dict(stage="pretrain"), "--stage sft -> pretrain"),
    (dict(seed=1, warmup=3), "--seed 0 -> 1; --warmup 2 -> 3"),
    (dict(max_length=128, long_samples="skip"), "--long-samples truncate -> skip; "
                                                "--max-length 256 -> 128"),
    (dict(train_vision=True, weight_decay=0.1), "--train-vision False -> True; "
                                                "--weight-decay 0.0 -> 0.1"),
])
def test_resume_with_other_settings_is_refused_naming_each(change, named, out,
                                                           micro_model_dir, shapes_dir):
    before = checkpoints(out)
    with pytest.raises(UserError) as e:
        resume(micro_model_dir, load_samples(shapes_dir / "train.json"), out,
               replace(CFG, **change))
    msg = str(e.value)
    assert f"made with other settings ({named})" in msg, msg
    assert "drop --resume to start over, or rerun with the saved settings" in msg
    assert "\n" not in msg
    assert checkpoints(out) == before and not out.exists()  # nothing ran


@pytest.mark.parametrize("which, named", [
    (lambda s: s[:-1], "training data 64 samples, sha256 "),  # -> 63 samples
    (lambda s: s[::-1], "training data 64 samples, sha256 "),  # same samples, other order
])
def test_resume_on_other_data_is_refused(which, named, out, micro_model_dir, shapes_dir):
    samples = load_samples(shapes_dir / "train.json")
    with pytest.raises(UserError, match=named) as e:
        resume(micro_model_dir, which(samples), out, CFG)
    assert f"-> {len(which(samples))} samples" in str(e.value)


@pytest.mark.slow
def test_resume_may_change_when_checkpoints_are_saved(out, micro_model_dir, shapes_dir,
                                                      tmp_path):
    """save_every and save_every_minutes only decide when checkpoints are written: the resumed
    run continues at step 5 and ends with the weights an uninterrupted run ends with."""
    samples = load_samples(shapes_dir / "train.json")
    ref = train.run(load_model(micro_model_dir), samples, tmp_path / "ref", CFG, quiet=True)
    r = resume(micro_model_dir, samples, out, replace(CFG, save_every=100,
                                                      save_every_minutes=5.0))
    assert r.resumed_from == 4 and [h["step"] for h in r.history] == [5, 6]
    assert r.final_loss == pytest.approx(ref.final_loss, abs=1e-5)
    a, b = (load_model(p).model.state_dict() for p in (tmp_path / "ref", out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def test_a_checkpoint_that_does_not_fit_is_one_line(out, micro_model_dir, shapes_dir):
    """Checkpoints without saved settings (an older edgevlm's) cannot be compared; at another
    stage they still do not fit the optimizer: one line, not accelerate's ValueError."""
    (out.parent / ".o.work" / RESUME_SETTINGS).unlink()
    with pytest.raises(UserError, match=r"checkpoint .*step_4 does not fit this run \(loaded "
                       r"state dict contains a parameter group .*\); drop --resume"):
        resume(micro_model_dir, load_samples(shapes_dir / "train.json"), out,
               replace(CFG, stage="pretrain"))


def test_damaged_checkpoint_or_settings_are_one_line(out, micro_model_dir, shapes_dir):
    samples = load_samples(shapes_dir / "train.json")
    work = out.parent / ".o.work"
    (work / RESUME_SETTINGS).write_text("[1, 2")
    with pytest.raises(UserError, match=r"resume_settings\.json cannot be read .*drop --resume"):
        resume(micro_model_dir, samples, out, CFG)
    (work / RESUME_SETTINGS).unlink()
    weights = work / "checkpoints" / "step_4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match=r"checkpoint .*step_4 does not fit this run \(.*\); "
                       "drop --resume"):
        resume(micro_model_dir, samples, out, CFG)


@pytest.mark.slow
def test_train_cli_resume_at_another_stage_is_one_line(out, micro_model_dir, shapes_dir):
    code, text = run("train", micro_model_dir, shapes_dir / "train.json", "--out", out,
                     "--steps", 6, "--batch-size", 4, "--lr", 3e-3, "--warmup", 2,
                     "--save-every", 2, "--stage", "pretrain", "--resume", "--quiet")
    text = without_notes(text)
    assert code == 2 and len(text.splitlines()) == 1, text
    assert "--stage sft -> pretrain" in text and "drop --resume" in text, text


# ---- distillation: a stage resumed mid-way goes through train.run ------------------------------

@pytest.mark.slow
def test_distill_stage_resume_compares_the_loss_settings(teacher_dir, micro_model_dir,
                                                         shapes_dir, tmp_path, monkeypatch):
    from edgevlm.distill import DistillConfig, distill
    from edgevlm.distill.stages import TeacherLoss

    out = tmp_path / "kd"
    cfg = DistillConfig(stages="dpt", train=CFG)
    args = (teacher_dir, micro_model_dir, None, out)
    kw = dict(pretrain_data=shapes_dir / "pretrain.json", quiet=True)
    monkeypatch.setattr(TeacherLoss, "__call__", killing(TeacherLoss.__call__))
    with pytest.raises(Killed):
        distill(*args, cfg, **kw)
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"\.dpt\.work were made with other settings \(--steps "
                       r"6 -> 8; --w-vis 1\.0 -> 0\.5\)"):
        distill(*args, replace(cfg, w_vis=0.5, train=replace(cfg.train, steps=8)), **kw,
                resume=True)
    r = distill(*args, replace(cfg, vocab_chunk=64), **kw, resume=True)  # memory only
    assert r.stages[0].resumed_from == 4


MOD_CFG = dict(stages="sparse", train=replace(CFG, lr=1e-4, warmup=1))


@pytest.fixture
def killed_sparse(teacher_dir, micro_model_dir, shapes_dir, tmp_path, monkeypatch):
    """The args of a LLaVA-MoD sparse stage killed in step 5, from an upcycled micro model."""
    from edgevlm.distill.mod import MimicLoss, ModConfig, distill_mod
    from edgevlm.models.moe import upcycle_dir

    moe = tmp_path / "moe"
    upcycle_dir(micro_model_dir, moe)
    args = (teacher_dir, moe, shapes_dir / "train.json", tmp_path / "mod")
    monkeypatch.setattr(MimicLoss, "__call__", killing(MimicLoss.__call__))
    with pytest.raises(Killed):
        distill_mod(*args, ModConfig(**MOD_CFG), quiet=True)
    monkeypatch.undo()
    return args


def test_llava_mod_stage_resume_compares_the_loss_settings(killed_sparse):
    from edgevlm.distill.mod import ModConfig, distill_mod

    with pytest.raises(UserError, match=r"\.sparse\.work were made with other settings "
                       r"\(--aux-weight 0\.01 -> 0\.1; --ce-weight 1\.0 -> 0\.5\)"):
        distill_mod(*killed_sparse, ModConfig(**MOD_CFG, aux_weight=0.1, ce_weight=0.5),
                    quiet=True, resume=True)
    ckpts = killed_sparse[3] / ".sparse.work" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2", "step_4"]  # nothing ran


@pytest.mark.slow
def test_llava_mod_sparse_stage_resumes_exactly(killed_sparse, tmp_path):
    """The MoE's empty shared expert is not in accelerate's checkpoint (it saves no
    zero-element tensor); the sparse stage still resumes, and ends where an uninterrupted run
    ends."""
    from edgevlm.distill.mod import ModConfig, distill_mod

    teacher, moe, data, out = killed_sparse
    r = distill_mod(*killed_sparse, ModConfig(**MOD_CFG), quiet=True, resume=True)
    assert r.stages[0].resumed_from == 4 and [h["step"] for h in r.stages[0].history] == [5, 6]
    distill_mod(teacher, moe, data, tmp_path / "ref", ModConfig(**MOD_CFG), quiet=True)
    a, b = (load_model(p / "sparse").model.state_dict() for p in (tmp_path / "ref", out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
