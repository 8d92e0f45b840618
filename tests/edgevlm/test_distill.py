"""Distillation: the LLaVA-KD loss terms, the three stages end to end, 2 processes, bad input."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from edgevlm import train
from edgevlm.data import load_samples
from edgevlm.distill import DistillConfig, LossWeights, distill
from edgevlm.distill.checks import check_pair
from edgevlm.distill.losses import (
    distill_terms,
    relation_loss,
    relation_matrix,
    response_kl,
    visual_kl,
)
from edgevlm.distill.measure import teacher_kl
from edgevlm.distill.stages import TeacherLoss
from edgevlm.errors import UserError
from edgevlm.models import init_model, load_model, save_model
from tests.tools import TORCHRUN

CLI = [sys.executable, "-m", "edgevlm.cli"]
IMG = 7  # image token id in the synthetic logit tests

def _batch(b=2, s=20, v=50, n_img=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, v, (b, s), generator=g)
    ids[:, 2: 2 + n_img] = IMG
    labels = torch.full((b, s), -100)
    labels[:, 12:17] = ids[:, 12:17]
    labels[1, 16] = -100  # ragged answers
    return ids, labels, torch.randn(b, s, v, generator=g), torch.randn(b, s, v, generator=g)


# ---- loss terms -------------------------------------------------------------------------------

def test_terms_are_zero_when_student_equals_teacher():
    ids, labels, s, _ = _batch()
    assert response_kl(s, s.clone(), labels).abs() < 1e-6
    assert visual_kl(s, s.clone(), ids, IMG).abs() < 1e-6
    assert relation_loss(s, s.clone(), ids, IMG).abs() < 1e-6
    assert relation_loss(s, s.clone(), ids, IMG, per_sample=False).abs() < 1e-6
    ce = torch.tensor(1.5)
    total, terms = distill_terms(ce, s, s.clone(), {"input_ids": ids, "labels": labels}, IMG,
                                 LossWeights())
    assert set(terms) == {"ce", "res_kl", "vis_kl", "rdist"}
    assert abs(float(total) - 1.5) < 1e-5


def test_kl_matches_torch_kl_div():
    ids, labels, s, t = _batch()
    for temp in (1.0, 2.0):
        mask = labels[:, 1:] != -100
        ls = F.log_softmax(s[:, :-1][mask] / temp, -1)
        lt = F.log_softmax(t[:, :-1][mask] / temp, -1)
        ref = F.kl_div(ls, lt, log_target=True, reduction="batchmean") * temp**2
        assert torch.allclose(response_kl(s, t, labels, temp), ref, atol=1e-5)
        img = ids == IMG
        ref_v = F.kl_div(F.log_softmax(s[img] / temp, -1), F.log_softmax(t[img] / temp, -1),
                         log_target=True, reduction="batchmean") * temp**2
        assert torch.allclose(visual_kl(s, t, ids, IMG, temp), ref_v, atol=1e-5)
    # KL(teacher ‖ student), not the reverse
    assert not torch.allclose(response_kl(s, t, labels), response_kl(t, s, labels))


def test_rdist_scale_invariant_chunked_and_per_sample():
    ids, _, s, t = _batch(v=37)
    base = relation_loss(s, t, ids, IMG)
    assert base > 0.01
    assert torch.allclose(relation_loss(3.0 * s, t, ids, IMG), base, atol=1e-5)
    assert torch.allclose(relation_loss(s, 0.1 * t, ids, IMG), base, atol=1e-5)
    for chunk in (1, 5, 36, 1000):
        assert torch.allclose(relation_loss(s, t, ids, IMG, chunk=chunk), base, atol=1e-5)
        z = s[0][ids[0] == IMG]
        assert torch.allclose(relation_matrix(z, chunk), z @ z.T, atol=1e-4)
    # per sample = mean of the samples' own losses; batch mode = one matrix over all tokens
    one = [relation_loss(s[i: i + 1], t[i: i + 1], ids[i: i + 1], IMG) for i in range(2)]
    assert torch.allclose(base, sum(one) / 2, atol=1e-6)
    zs, zt = s[ids == IMG], t[ids == IMG]
    ref = 1 - F.cosine_similarity((zs @ zs.T).flatten(), (zt @ zt.T).flatten(), dim=0)
    assert torch.allclose(relation_loss(s, t, ids, IMG, per_sample=False), ref, atol=1e-5)


def test_chunked_kl_matches_in_value_and_gradient():
    from edgevlm.distill.losses import mean_kl, token_kl

    _, _, s, t = _batch(v=41)
    s, t = s.reshape(-1, 41), t.reshape(-1, 41)
    a = s.clone().requires_grad_(True)
    b = s.clone().requires_grad_(True)
    ref = token_kl(a, t, 2.0).mean()
    got = mean_kl(b, t, 2.0, rows=7)
    ref.backward()
    got.backward()
    assert torch.allclose(ref, got, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_zero_weight_terms_are_skipped():
    ids, labels, s, t = _batch()
    total, terms = distill_terms(torch.tensor(0.0), s, t, {"input_ids": ids, "labels": labels},
                                 IMG, LossWeights(res=1, vis=0, rel=0))
    assert set(terms) == {"ce", "res_kl"}
    assert torch.allclose(total, response_kl(s, t, labels))


# ---- models -----------------------------------------------------------------------------------

def _grad_parts(model):
    parts = set()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts.add("projector" if "multi_modal_projector" in n else
                      "vision" if "vision_tower" in n else "llm")
    return parts


@pytest.mark.slow
@pytest.mark.parametrize("stage,expect", [("pretrain", {"projector"}),
                                          ("sft", {"projector", "llm"})])
def test_gradients_reach_only_the_trained_parts(teacher_dir, micro_model_dir, shapes_dir,
                                                stage, expect):
    from edgevlm.data import Collator

    teacher = load_model(teacher_dir)
    teacher.model.requires_grad_(False)
    student = load_model(micro_model_dir)
    train.set_trainable(student.model, stage)
    batch = Collator(student.processor, student.num_image_tokens)(
        load_samples(shapes_dir / "train.json")[:3])
    loss, terms = TeacherLoss(teacher.model, teacher.image_token_id, LossWeights())(
        student.model, batch)
    assert all(float(v) > 0 for v in terms.values()), terms
    loss.backward()
    assert _grad_parts(student.model) == expect
    assert all(p.grad is None for p in teacher.model.parameters())


# ---- the three stages -------------------------------------------------------------------------

@pytest.mark.slow
def test_three_stages_crash_resume_and_kl(teacher_dir, micro_model_dir, shapes_dir, tmp_path,
                                          monkeypatch):
    out = tmp_path / "kd"
    cfg = DistillConfig(stages="dpt,sft,dft", dpt_steps=6, train=train.TrainConfig(
        steps=12, batch_size=8, lr=3e-3, warmup=2, save_every=4))
    args = (teacher_dir, micro_model_dir, shapes_dir / "train.json", out, cfg)
    kw = {"pretrain_data": shapes_dir / "pretrain.json", "quiet": True}

    calls, real_call = [], TeacherLoss.__call__

    def crash_in_dft(self, model, batch):  # dpt takes 6 calls; die at dft step 10
        calls.append(1)
        if len(calls) == 6 + 10:
            raise RuntimeError("simulated crash at dft step 10")
        return real_call(self, model, batch)

    monkeypatch.setattr(TeacherLoss, "__call__", crash_in_dft)
    with pytest.raises(RuntimeError, match="simulated"):
        distill(*args, **kw)
    monkeypatch.undo()
    assert (out / "dpt" / "config.json").is_file() and (out / "sft" / "config.json").is_file()
    assert not (out / "dft").exists()
    with pytest.raises(UserError, match="already exists"):
        distill(*args, **kw)

    res = distill(*args, **kw, resume=True)  # finished stages kept, dft resumes at step 8
    assert [(r.stage, r.skipped) for r in res.stages] == [("dpt", True), ("sft", True),
                                                          ("dft", False)]
    assert res.stages[-1].resumed_from == 8
    for stage in ("dpt", "sft", "dft", "final"):
        load_model(out / stage)
    log = json.loads((out / "dft" / "train_log.json").read_text())
    assert log[-1]["step"] == 12 and {"ce", "res_kl", "vis_kl", "rdist"} <= set(log[0])
    meta = json.loads((out / "dpt" / "distill_config.json").read_text())
    assert meta["stage"] == "dpt"
    assert json.loads((out / "dpt" / "train_config.json").read_text())["stage"] == "pretrain"

    held_out = load_samples(shapes_dir / "eval.json")
    teacher = load_model(teacher_dir)
    kl_sft = teacher_kl(load_model(out / "sft"), teacher, held_out)
    kl_dft = teacher_kl(load_model(out / "dft"), teacher, held_out)
    print(f"held-out KL to the teacher: sft {kl_sft:.4f}, dft {kl_dft:.4f}")
    assert kl_dft < 0.9 * kl_sft, (kl_sft, kl_dft)


@pytest.mark.slow
def test_two_process_distillation(teacher_dir, micro_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29547", "-m", "edgevlm.cli",
           "distill", "--teacher", str(teacher_dir), "--student", str(micro_model_dir),
           "--data", str(shapes_dir / "train.json"), "--out", str(out), "--stages", "sft,dft",
           "--steps", "6", "--batch-size", "2", "--save-every", "3", "--warmup", "1",
           "--lr", "3e-3", "--quiet"]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    report = json.loads((out / "distill.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["sft", "dft"]
    log = json.loads((out / "dft" / "train_log.json").read_text())
    assert len(log) == 6 and all(h["res_kl"] > 0 for h in log)
    load_model(out / "final")


def _mixed_data(shapes_dir, tmp_path, n_text=6, n_image=2):
    """Shapes conversations, most of them made text-only (no image key, no <image>) as
    LLaVA-665k's ShareGPT entries are."""
    rows = json.loads((shapes_dir / "train.json").read_text())[: n_text + n_image]
    for row in rows[:n_text]:
        del row["image"]
        first = row["conversations"][0]
        first["value"] = first["value"].replace("<image>\n", "")
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(rows))
    return path


def test_teacher_loss_with_text_only_samples(teacher_dir, micro_model_dir, shapes_dir,
                                             tmp_path):
    from edgevlm.data import Collator

    teacher, student = load_model(teacher_dir), load_model(micro_model_dir)
    teacher.model.requires_grad_(False)
    text, image = load_samples(_mixed_data(shapes_dir, tmp_path, n_text=1, n_image=1),
                               shapes_dir)
    collate = Collator(student.processor, student.num_image_tokens)
    loss_fn = TeacherLoss(teacher.model, teacher.image_token_id, LossWeights())
    _, alone = loss_fn(student.model, collate([image]))
    mixed_batch = collate([text, image])
    assert mixed_batch["pixel_values"].shape[0] == 1
    _, mixed = loss_fn(student.model, mixed_batch)
    # the visual terms are over the image sample's tokens only, whatever shares its batch
    for k in ("vis_kl", "rdist"):
        assert float(mixed[k]) == pytest.approx(float(alone[k]), rel=1e-4), k
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in mixed.values())
    train.set_trainable(student.model, "sft")
    loss, terms = loss_fn(student.model, collate([text, text]))
    assert float(terms["vis_kl"]) == float(terms["rdist"]) == 0.0
    assert float(terms["ce"]) > 0 and float(terms["res_kl"]) > 0
    loss.backward()
    assert _grad_parts(student.model) == {"llm"}


@pytest.mark.slow
def test_two_process_distillation_with_text_only_batches(teacher_dir, micro_model_dir,
                                                         shapes_dir, tmp_path):
    """DPT trains the projector alone; a process whose batch has no image must still join
    DDP's gradient reduction (and have a loss to backward)."""
    data = _mixed_data(shapes_dir, tmp_path)  # beside no images: --image-root for both files
    samples = load_samples(data, shapes_dir)
    text_only_steps = [step for step in range(4) if {
        samples[i].image is None for i in train.batch_indices(len(samples), 2, 0, step)}
        == {True, False}]
    assert text_only_steps  # a step where one process has only text, the other an image
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29549", "-m", "edgevlm.cli",
           "distill", "--teacher", str(teacher_dir), "--student", str(micro_model_dir),
           "--data", str(data), "--pretrain-data", str(data), "--out", str(out),
           "--stages", "dpt,dft", "--steps", "4", "--batch-size", "1", "--save-every", "10",
           "--warmup", "1", "--lr", "3e-3", "--image-root", str(shapes_dir), "--quiet"]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    report = json.loads((out / "distill.json").read_text())
    assert report["data"]["dpt"]["text_only"] == report["data"]["sft"]["text_only"] == 6
    for stage in ("dpt", "dft"):
        log = json.loads((out / stage / "train_log.json").read_text())
        assert len(log) == 4 and all(math.isfinite(h["loss"]) for h in log)
    before, after = load_model(micro_model_dir).model, load_model(out / "dpt").model
    moved = [not torch.equal(a, b) for a, b in zip(
        before.model.multi_modal_projector.parameters(),
        after.model.multi_modal_projector.parameters())]
    assert any(moved)


# ---- bad input, named -------------------------------------------------------------------------

def _other_model(tmp_path, tokenizer, name, config, **vision):
    cfg = copy.deepcopy(config)
    cfg["vision_config"].update(vision)
    out = tmp_path / name
    save_model(init_model(cfg, tokenizer), out)
    return out


def test_mismatched_tokenizers_are_named(teacher_dir, shapes_dir, tokenizer, tmp_path,
                                         teacher_config):
    from edgevlm.models.tokenizer import train_tokenizer

    texts = [t for s in load_samples(shapes_dir / "train.json") for turn in s.turns
             for t in turn]
    data = shapes_dir / "train.json"
    small_vocab = _other_model(tmp_path, train_tokenizer(texts, 300), "vocab", teacher_config)
    with pytest.raises(UserError, match="vocabulary sizes differ"):
        distill(teacher_dir, small_vocab, data, tmp_path / "o1", DistillConfig(stages="sft"))
    fewer_tokens = _other_model(tmp_path, tokenizer, "img", teacher_config, image_size=32)
    with pytest.raises(UserError, match="image token counts differ.*teacher 9, student 4"):
        distill(teacher_dir, fewer_tokens, data, tmp_path / "o2", DistillConfig(stages="sft"))
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_other_bad_inputs(teacher_dir, micro_model_dir, shapes_dir, tmp_path):
    data = shapes_dir / "train.json"
    with pytest.raises(UserError, match="impossible order.*give e.g. sft,dft"):
        DistillConfig(stages="dft,sft")
    with pytest.raises(UserError, match="unknown stage 'kd'"):
        DistillConfig(stages="sft,kd")
    with pytest.raises(UserError, match="--pretrain-data"):
        distill(teacher_dir, micro_model_dir, data, tmp_path / "o", DistillConfig())
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        distill(teacher_dir, micro_model_dir, data, tmp_path / "exists",
                DistillConfig(stages="sft"))
    not_llava = tmp_path / "qwen"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(UserError, match="teacher: .*'qwen2' is not a model family edgevlm knows"):
        distill(not_llava, micro_model_dir, data, tmp_path / "o", DistillConfig(stages="sft"))
    # a student larger than its teacher only warns
    warnings = check_pair(load_model(micro_model_dir), load_model(teacher_dir))
    assert len(warnings) == 1 and "larger than the teacher" in warnings[0]
    r = subprocess.run([*CLI, "distill", "--teacher", str(teacher_dir), "--student",
                        str(micro_model_dir), "--data", str(data), "--out",
                        str(tmp_path / "cli"), "--stages", "dft,dpt"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "impossible order" in r.stderr


def test_save_every_minutes_reaches_each_stage(teacher_dir, micro_model_dir, shapes_dir,
                                               tmp_path):
    """distill checkpoints by time as train does: the setting is checked and handed to every
    stage's training (whose own test kills and resumes from a time checkpoint)."""
    from edgevlm.distill.mod import ModConfig

    cfg = DistillConfig(stages="sft", train=train.TrainConfig(steps=2, batch_size=4, warmup=1,
                                                              save_every_minutes=0.5))
    distill(teacher_dir, micro_model_dir, shapes_dir / "train.json", tmp_path / "kd", cfg,
            quiet=True)
    saved = json.loads((tmp_path / "kd" / "sft" / "train_config.json").read_text())
    assert saved["save_every_minutes"] == 0.5 and saved["save_every"] == 200
    for bad in (0, -1.0, float("nan")):
        for config in (DistillConfig, ModConfig):
            with pytest.raises(UserError, match=r"--save-every-minutes .* positive"):
                config(train=train.TrainConfig(save_every_minutes=bad))
