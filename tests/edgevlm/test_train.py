"""Training: trainable parts per stage, resume after a kill, 2-process accelerate, eval CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgevlm.errors import UserError
from edgevlm.models import load_model
from edgevlm.train import TrainConfig, batch_indices, set_trainable
from tests.tools import TORCHRUN

CLI = [sys.executable, "-m", "edgevlm.cli"]


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _train_cmd(model, data, out, *extra, steps: int = 12):
    return [*CLI, "train", str(model), str(data), "--out", str(out), "--steps", str(steps),
            "--batch-size", "4", "--save-every", "4", "--lr", "3e-3", "--warmup", "2",
            "--quiet", *extra]


def test_stages_train_the_right_parts(micro_model_dir):
    m = load_model(micro_model_dir).model
    n_pre = set_trainable(m, "pretrain")
    assert all(p.requires_grad == ("multi_modal_projector" in n) for n, p in m.named_parameters())
    n_sft = set_trainable(m, "sft")
    assert n_sft > n_pre
    assert not any(p.requires_grad for n, p in m.named_parameters() if "vision_tower" in n)
    assert any(p.requires_grad for n, p in m.named_parameters() if "language_model" in n)


def test_data_order_is_a_function_of_step():
    first = [batch_indices(10, 4, 0, s) for s in range(6)]
    assert first == [batch_indices(10, 4, 0, s) for s in range(6)]
    # each epoch is a permutation: steps 0..4 cover samples 0..19 = two full epochs
    flat = sum(first[:5], [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_bad_train_config():
    with pytest.raises(UserError, match="stage 'finetune'"):
        TrainConfig(stage="finetune")
    with pytest.raises(UserError, match="steps must be at least 1"):
        TrainConfig(steps=0)


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(micro_model_dir, shapes_dir, tmp_path):
    # The run is killed as soon as its step-8 checkpoint appears; STEPS leaves it over a hundred
    # more steps (about a second on a fast machine), so the kill always lands mid-run.
    steps = 120
    data = shapes_dir / "train.json"
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(micro_model_dir, data, ref, steps=steps), check=True)

    out = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(micro_model_dir, data, out, steps=steps))
    ckpts = tmp_path / ".run.work" / "checkpoints"
    deadline = time.time() + 120
    while not (ckpts / "step_8").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists(), "a killed run must not leave OUT"
    r = subprocess.run(_train_cmd(micro_model_dir, data, out, "--resume", "--json", steps=steps),
                       check=True, capture_output=True, text=True)
    assert json.loads(r.stdout)["resumed from"] >= 4
    a, b = _weights(ref), _weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert not (tmp_path / ".run.work").exists()


def test_checkpoints_by_time_and_resume_from_one(micro_model_dir, shapes_dir, tmp_path):
    """--save-every-minutes 1 with a clock at 25 s a step and --save-every 4: checkpoints at
    step 3 (75 s), step 4 (steps; the timer starts again) and step 7 (75 s after it). Killed
    in step 8, the run resumes from step 7, not a multiple of --save-every, and ends where an
    uninterrupted run ends."""
    from edgevlm import train
    from edgevlm.data import load_samples

    samples = load_samples(shapes_dir / "train.json")
    kw = dict(stage="sft", steps=10, batch_size=4, lr=3e-3, warmup=2)
    ref = tmp_path / "ref"
    train.run(load_model(micro_model_dir), samples, ref, TrainConfig(**kw, save_every=1000),
              quiet=True)

    cfg = TrainConfig(**kw, save_every=4, save_every_minutes=1)
    now = [0.0]

    class Killed(Exception):
        pass

    def loss_25s_a_step(model, batch):
        if now[0] == 7 * 25:
            raise Killed  # step 8
        now[0] += 25
        return train.ce_loss(model, batch)

    out = tmp_path / "run"
    with pytest.raises(Killed):
        train.run(load_model(micro_model_dir), samples, out, cfg, loss_fn=loss_25s_a_step,
                  quiet=True, clock=lambda: now[0])
    ckpts = tmp_path / ".run.work" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_4", "step_7"]  # keeps the last 2
    r = train.run(load_model(micro_model_dir), samples, out, cfg, resume=True, quiet=True)
    assert r.resumed_from == 7 and [h["step"] for h in r.history] == [8, 9, 10]
    a, b = _weights(ref), _weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    assert not (tmp_path / ".run.work").exists()


def test_save_every_minutes_is_a_positive_number():
    assert TrainConfig(save_every_minutes=0.5).save_every_minutes == 0.5
    for bad in (0, -1, float("nan"), float("inf"), True):
        with pytest.raises(UserError, match=r"--save-every-minutes .* must be a positive number"):
            TrainConfig(save_every_minutes=bad)
    r = subprocess.run([*CLI, "train", "m", "d.json", "--out", "o", "--save-every-minutes", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--save-every-minutes 0.0 must be a positive" in r.stderr


@pytest.mark.slow
def test_resume_without_checkpoint_and_existing_out(micro_model_dir, shapes_dir, tmp_path):
    r = subprocess.run(_train_cmd(micro_model_dir, shapes_dir / "train.json", tmp_path / "o",
                                  "--resume"), capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    (tmp_path / "o").mkdir()
    r = subprocess.run(_train_cmd(micro_model_dir, shapes_dir / "train.json", tmp_path / "o"),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr


@pytest.mark.slow
def test_two_process_training(micro_model_dir, shapes_dir, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", "29533", "-m", "edgevlm.cli",
           *_train_cmd(micro_model_dir, shapes_dir / "train.json", out)[3:]]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    log = json.loads((out / "train_log.json").read_text())
    assert len(log) == 12
    assert sum(h["loss"] for h in log[-3:]) < sum(h["loss"] for h in log[:3])
    before, after = _weights(micro_model_dir), _weights(out)
    key = next(k for k in before if k.endswith("layers.0.mlp.up_proj.weight"))
    assert not torch.equal(before[key], after[key])
    load_model(out)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.slow
def test_two_process_resume_after_kill(micro_model_dir, shapes_dir, tmp_path):
    """DDP (2 gloo processes): killed at its step-8 checkpoint and resumed, the run ends where
    an uninterrupted 2-process run ends. The model is saved through accelerate's
    get_state_dict on every rank (under FSDP that gathers the shards; accelerate 1.16 turns
    FSDP on only for GPU-type process groups, never MULTI_CPU, so FSDP itself is not run here)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    steps = 60

    def cmd(out, port, *extra):
        return [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), "-m",
                "edgevlm.cli", *_train_cmd(micro_model_dir, shapes_dir / "train.json", out,
                                           *extra, steps=steps)[3:]]

    subprocess.run(cmd(tmp_path / "ref", 29534), check=True, env=env, timeout=300)
    out = tmp_path / "run"
    proc = subprocess.Popen(cmd(out, 29535), env=env)
    ckpt = tmp_path / ".run.work" / "checkpoints" / "step_8"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun and its workers, which it
        try:  # starts in sessions of their own
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    subprocess.run(cmd(out, 29536, "--resume"), check=True, env=env, timeout=300)
    processes = json.loads((out / "train_processes.json").read_text())
    assert processes == {"distributed_type": "DistributedType.MULTI_CPU", "num_processes": 2}
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log][0] > 8 and log[-1]["step"] == steps  # resumed, not redone
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow
def test_train_mixes_several_data_files(micro_model_dir, shapes_dir, tmp_path):
    files = [shapes_dir / "train.json", shapes_dir / "pretrain.json"]
    r = subprocess.run([*CLI, "train", str(micro_model_dir), *map(str, files), "--out",
                        str(tmp_path / "o"), "--steps", "2", "--batch-size", "2", "--json"],
                       capture_output=True, text=True, check=True)
    n = sum(len(json.loads(f.read_text())) for f in files)
    assert json.loads(r.stdout)["samples"] == n
    r = subprocess.run([*CLI, "train", str(micro_model_dir), str(files[0]),
                        str(tmp_path / "x.json"), "--out", str(tmp_path / "o2"), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "x.json" in r.stderr and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_eval_cli_writes_json(micro_model_dir, shapes_dir, tmp_path):
    res = tmp_path / "res.json"
    subprocess.run([*CLI, "eval", str(micro_model_dir), str(shapes_dir / "eval.json"),
                    "--limit", "6", "--json", str(res), "--quiet"], check=True)
    d = json.loads(res.read_text())
    assert d["total"] == 6 and len(d["predictions"]) == 6
    assert sum(p["correct"] for p in d["predictions"]) == d["correct"]
    assert d["accuracy"] == pytest.approx(d["correct"] / 6)
    # the JSON holds the model's own greedy answers: those of edgevlm.evaluate on the same model
    from edgevlm.data import load_samples
    from edgevlm.evaluate import evaluate

    again = evaluate(load_model(micro_model_dir), load_samples(shapes_dir / "eval.json")[:6],
                     16, 16, True)
    assert [p["prediction"] for p in d["predictions"]] == [
        p["prediction"] for p in again.to_dict()["predictions"]]
