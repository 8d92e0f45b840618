"""LLaVA-MoD: sparse upcycling, the mimic and preference losses, the recipe end to end, the MoE
export (onnxruntime MoE / QMoE) and the runtime on it, and bad input."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgevlm.distill.preference import (
    Pair,
    build_pairs,
    preference_loss,
    read_pairs,
    sequence_logps,
)
from edgevlm.errors import UserError
from edgevlm.models import init_model, load_model, save_model
from edgevlm.models.moe import (
    MoESpec,
    RouterLogits,
    load_balance_loss,
    parameter_counts,
    upcycle,
    upcycle_dir,
)

CLI = [sys.executable, "-m", "edgevlm.cli"]


def _inputs(loaded, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (2, 30), generator=g)
    ids[:, 2: 2 + loaded.num_image_tokens] = loaded.image_token_id
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 48, 48, generator=g)}


@pytest.fixture(scope="module")
def dense(micro_model_dir, ragged_model_dir):
    """conftest's micro (Qwen2) and ragged (Llama) models."""
    return {"qwen2": load_model(micro_model_dir), "llama": load_model(ragged_model_dir)}


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, micro_model_dir):
    out = tmp_path_factory.mktemp("moe") / "up"
    upcycle_dir(micro_model_dir, out)
    return out


# ---- upcycling --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_upcycled_model_computes_the_dense_model(dense, kind):
    """Experts are copies and the top-2 weights sum to one: the logits are the dense model's,
    whatever the router says, before any training."""
    loaded = dense[kind]
    up = upcycle(loaded, MoESpec(experts=4, top_k=2))
    x = _inputs(loaded)
    with torch.no_grad():
        a, b = loaded.model(**x).logits, up.model(**x).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (a - b).abs().max() < 1e-5
    tc = up.model.config.text_config
    assert tc.model_type == "qwen2_moe" and tc.shared_expert_intermediate_size == 0
    assert tc.mlp_only_layers == [1] and tc.num_experts == 4 and tc.num_experts_per_tok == 2
    layers = up.model.model.language_model.layers
    assert hasattr(layers[0].mlp, "experts") and not hasattr(layers[1].mlp, "experts")


def test_random_experts_change_the_function(dense):
    loaded = dense["qwen2"]
    up = upcycle(loaded, MoESpec(init="random"))
    x = _inputs(loaded)
    with torch.no_grad():
        assert (loaded.model(**x).logits - up.model(**x).logits).abs().max() > 1e-3


def test_parameter_counts(dense):
    loaded = dense["qwen2"]
    dense_n = parameter_counts(loaded.model)
    assert dense_n["activated"] == dense_n["total"]
    tc = loaded.model.config.text_config
    ffn = 3 * tc.hidden_size * tc.intermediate_size  # one layer's SwiGLU FFN
    for k in (1, 2):
        c = parameter_counts(upcycle(loaded, MoESpec(experts=4, top_k=k)).model)
        router = 4 * tc.hidden_size
        # layer 0 gets 4 experts (3 more FFNs) and a router (+ the empty shared expert's gate)
        assert c["total"] == dense_n["total"] + 3 * ffn + router + tc.hidden_size
        assert c["activated"] == dense_n["total"] + (k - 1) * ffn + router + tc.hidden_size


def test_upcycled_directory_reloads_identically(micro_model_dir, moe_dir):
    a, b = load_model(micro_model_dir), load_model(moe_dir)
    x = _inputs(a, seed=3)
    with torch.no_grad():
        assert (a.model(**x).logits - b.model(**x).logits).abs().max() < 1e-5
    assert type(b.model.model.language_model).__name__ == "Qwen2MoeModel"


@pytest.mark.parametrize("spec, message", [
    (MoESpec(experts=4, top_k=5), "--top-k 5 must be between 1 and --experts 4"),
    (MoESpec(experts=1, top_k=1), "at least 2 experts"),
    (MoESpec(layers="0,7"), "[7] are outside it"),
    (MoESpec(layers="odd"), "is not every-other, all, or a comma list"),
])
def test_upcycle_bad_specs(dense, spec, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        upcycle(dense["qwen2"], spec)


def test_upcycling_an_moe_model_is_refused(moe_dir):
    with pytest.raises(UserError, match="already a mixture of experts"):
        upcycle(load_model(moe_dir))


@pytest.mark.slow
def test_cli_moe_upcycle(tmp_path, micro_model_dir):
    out = tmp_path / "up"
    r = subprocess.run([*CLI, "moe-upcycle", str(micro_model_dir), "--out", str(out),
                        "--experts", "3", "--top-k", "1", "--layers", "all", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["mlp_only_layers"]) == (3, 1, [])
    bad = subprocess.run([*CLI, "moe-upcycle", str(micro_model_dir), "--out",
                          str(tmp_path / "x"), "--top-k", "8"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--top-k 8 must be between 1 and --experts 4" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "x").exists()


# ---- losses -----------------------------------------------------------------------------------

def test_load_balance_loss_is_one_when_balanced_and_grows_when_not():
    """E·Σ f_e·P_e with f_e counting each token's k picks (transformers' Mixtral/Qwen2-MoE
    form): k when routing is uniform, E when every token goes to the same k experts."""
    uniform = [torch.zeros(64, 4)]
    assert load_balance_loss(uniform, 4, 2).item() == pytest.approx(2.0, abs=1e-6)
    collapsed = torch.full((64, 4), -20.0)
    collapsed[:, :2] = 20.0  # every token to experts 0 and 1
    assert load_balance_loss([collapsed], 4, 2).item() == pytest.approx(4.0, abs=1e-4)


def test_router_logits_are_collected_per_router(moe_dir):
    loaded = load_model(moe_dir)
    with RouterLogits(loaded.model) as routed, torch.no_grad():
        loaded.model(**_inputs(loaded))
    assert len(routed.logits) == 1 and routed.logits[0].shape == (2 * 30, 4)
    assert not loaded.model.model.language_model.layers[0].mlp.gate._forward_hooks


def test_sequence_logps_sums_the_shifted_answer_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = torch.tensor([4, 7])
    labels[1, 5] = 2
    lp = logits.log_softmax(-1)
    want = torch.stack([lp[0, 2, 4] + lp[0, 3, 7], lp[1, 4, 2]])
    assert torch.allclose(sequence_logps(logits, labels), want, atol=1e-6)


def test_preference_losses_match_their_formulas():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5])
    rc, rr = torch.tensor([-1.5, -2.5]), torch.tensor([-2.0, -2.0])
    loss, margin = preference_loss(pc, pr, rc, rr, beta=0.1, kind="sigmoid")
    z = 0.1 * ((pc - rc) - (pr - rr))
    assert loss.item() == pytest.approx(float(-F.logsigmoid(z).mean()), abs=1e-6)
    assert margin.item() == pytest.approx(float(z.mean()), abs=1e-6)
    # kto_pair (TRL's definition): KL terms are the batch means of the log-ratios, clamped at 0
    loss, _ = preference_loss(pc, pr, rc, rr, beta=0.1, kind="kto_pair")
    dc, dr = pc - rc, pr - rr
    kl_c, kl_r = max(float(dc.mean()), 0.0), max(float(dr.mean()), 0.0)
    want = torch.cat([1 - torch.sigmoid(0.1 * (dc - kl_r)), 1 - torch.sigmoid(0.1 * (kl_c - dr))])
    assert loss.item() == pytest.approx(float(want.mean()), abs=1e-6)
    # the chosen answer gaining on the reference lowers the DPO loss
    better, _ = preference_loss(pc + 1.0, pr, rc, rr)
    assert better < preference_loss(pc, pr, rc, rr)[0]


# ---- preference pairs -------------------------------------------------------------------------

def test_pairs_from_the_data(shapes_dir, micro_model_dir):
    from edgevlm.data import load_samples

    samples = load_samples(shapes_dir / "train.json")
    pairs, counts = build_pairs(load_model(micro_model_dir), samples, seed=0)
    assert pairs and sum(v for k, v in counts.items() if k != "dropped") == len(pairs)
    for p in pairs:
        assert p.chosen.strip().lower() != p.rejected.strip().lower()
        if p.source == "flip":
            assert {p.chosen, p.rejected} == {"yes", "no"}
    by_id = {s.id: s for s in samples}
    assert all(p.chosen == by_id[p.id].answer for p in pairs)


def test_read_pairs_in_rlaif_v_layout(tmp_path, shapes_dir):
    image = sorted((shapes_dir / "images").iterdir())[0]
    good = [{"image": str(image), "question": "What colour is the square?", "chosen": "red",
             "rejected": "blue"}]
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(good))
    (pair,) = read_pairs(path, image_root=shapes_dir)
    assert isinstance(pair, Pair) and pair.question.startswith("<image>")
    assert (pair.chosen, pair.rejected, pair.source) == ("red", "blue", "file")
    path.write_text(json.dumps([{**good[0], "rejected": "Red."}]))
    with pytest.raises(UserError, match="entry 0: the chosen and rejected answers are the same"):
        read_pairs(path, image_root=shapes_dir)
    path.write_text(json.dumps([{**good[0], "image": "missing.png"}]))
    with pytest.raises(UserError, match="missing.png does not exist"):
        read_pairs(path, image_root=shapes_dir)


# ---- the recipe -------------------------------------------------------------------------------

def test_llava_mod_recipe_end_to_end(tmp_path, shapes_dir, micro_model_dir, teacher_dir):
    from edgevlm.distill.mod import ModConfig, distill_mod
    from edgevlm.train import TrainConfig

    out = tmp_path / "mod"
    cfg = ModConfig(train=TrainConfig(steps=3, batch_size=4, warmup=1, save_every=100, lr=3e-3))
    r = distill_mod(teacher_dir, micro_model_dir, shapes_dir / "train.json", out, cfg,
                    quiet=True)
    assert [s.stage for s in r.stages] == ["dense", "upcycle", "sparse", "pref"]
    terms = {s.stage: s.history[-1] for s in r.stages if s.history}
    assert set(terms["dense"]) >= {"kd"} and "ce" not in terms["dense"]
    assert set(terms["sparse"]) >= {"kd", "ce", "aux"} and terms["sparse"]["aux"] >= 1.5
    assert set(terms["pref"]) >= {"pref", "margin", "won"}
    assert r.pairs and sum(r.pairs.values()) > 0
    dense, up, sparse, final = (load_model(out / s) for s in ("dense", "upcycle", "sparse",
                                                              "final"))
    assert final.model.config.text_config.model_type == "qwen2_moe"
    # the sparse stage trains the FFNs and routers only: attention and projector are frozen
    a, b = up.model.state_dict(), sparse.model.state_dict()
    frozen = [k for k in a if "self_attn" in k or "multi_modal_projector" in k]
    assert frozen and all(torch.equal(a[k], b[k]) for k in frozen)
    assert not torch.equal(a["model.language_model.layers.0.mlp.experts.gate_up_proj"],
                           b["model.language_model.layers.0.mlp.experts.gate_up_proj"])
    report = json.loads((out / "distill.json").read_text())
    assert report["recipe"] == "llava-mod" and report["pairs"] == r.pairs


def test_llava_mod_bad_input(tmp_path, shapes_dir, micro_model_dir, teacher_dir, moe_dir):
    from edgevlm.distill.mod import ModConfig, distill_mod

    with pytest.raises(UserError, match="--top-k 3 must be between 1 and --experts 2"):
        ModConfig(experts=2, top_k=3)
    with pytest.raises(UserError, match="impossible order"):
        ModConfig(stages="sparse,dense")
    with pytest.raises(UserError, match="dpt/sft/dft are --recipe llava-kd's"):
        ModConfig(stages="dpt")
    data = shapes_dir / "train.json"
    with pytest.raises(UserError, match="already a mixture of experts"):
        distill_mod(teacher_dir, moe_dir, data, tmp_path / "a", ModConfig())
    with pytest.raises(UserError, match="keep the upcycle stage"):
        distill_mod(teacher_dir, micro_model_dir, data, tmp_path / "b",
                    ModConfig(stages="sparse"))
    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps([{"question": "q", "chosen": "yes", "rejected": "yes"}]))
    with pytest.raises(UserError, match="the chosen and rejected answers are the same"):
        distill_mod(teacher_dir, moe_dir, None, tmp_path / "c", ModConfig(stages="pref"),
                    pref_data=pairs)
    assert not any((tmp_path / n).exists() for n in "abc")


def test_reference_with_another_tokenizer_is_refused(tmp_path, shapes_dir, moe_dir,
                                                     teacher_config):
    from edgevlm.distill.mod import ModConfig, distill_mod
    from edgevlm.models.tokenizer import train_tokenizer

    other = tmp_path / "other"
    save_model(init_model(teacher_config, train_tokenizer(["a b c d e"] * 20, 300), seed=0),
               other)
    with pytest.raises(UserError, match="vocabulary|tokenizer"):
        distill_mod(other, moe_dir, shapes_dir / "train.json", tmp_path / "o",
                    ModConfig(stages="pref"))


@pytest.mark.slow
def test_cli_distill_llava_mod(tmp_path, shapes_dir, micro_model_dir, teacher_dir):
    out = tmp_path / "cli"
    r = subprocess.run([*CLI, "distill", "--recipe", "llava-mod", "--teacher", str(teacher_dir),
                        "--student", str(micro_model_dir), "--data",
                        str(shapes_dir / "train.json"), "--out", str(out), "--stages",
                        "dense,upcycle,sparse", "--steps", "2", "--batch-size", "4",
                        "--experts", "2", "--top-k", "1", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "final" / "config.json").read_text())["text_config"]
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (2, 1)
    bad = subprocess.run([*CLI, "distill", "--recipe", "llava-moe", "--teacher",
                          str(teacher_dir), "--student", str(micro_model_dir), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--recipe 'llava-moe' is not one of llava-kd, llava-mod" \
        in bad.stderr


# ---- export and runtime -----------------------------------------------------------------------

def _ops(path):
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def test_moe_export_fp32_matches_transformers(tmp_path, moe_dir, shapes_dir):
    """The builder writes the MoE FFN as onnxruntime's MoE op; greedy tokens equal torch's
    (the export's own validation), and the runtime's answers equal transformers' generate."""
    from PIL import Image

    from edgevlm.data import load_samples
    from edgevlm.evaluate import generate_answers
    from edgevlm.export.exporter import ExportConfig, export
    from edgevlm.runtime import VLM

    trained = tmp_path / "trained"  # random routers + copies answer like the dense model; train
    # the experts apart a little so that routing decides the answer
    model = load_model(moe_dir)
    with torch.no_grad():
        for p in model.model.model.language_model.layers[0].mlp.experts.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(model, trained)
    out = tmp_path / "fp32"
    r = export(trained, out, ExportConfig(precision="fp32"), quiet=True)
    assert r.parity.passed and r.parity.greedy.identical
    assert r.parity.greedy.logits_max_abs < 1e-4
    assert "MoE" in _ops(out / "onnx" / "decoder_model_merged.onnx")
    samples = load_samples(shapes_dir / "eval.json")[:4]
    vlm = VLM.load(out, threads=1)
    ours = [vlm.generate(Image.open(s.image), s.question.replace("<image>", "").strip(),
                         max_new_tokens=6).token_ids for s in samples]
    torch_answers = generate_answers(load_model(trained), samples, 6, 4)
    tok = load_model(trained).processor.tokenizer
    assert [tok.decode(list(t), skip_special_tokens=True).strip() for t in ours] == \
        [a.strip() for a in torch_answers]
    # onnxruntime-genai runs the same MoE graph (its genai_config.json) to the same tokens
    import onnxruntime_genai as og

    ids = tok("What colour is the circle?", add_special_tokens=False)["input_ids"]
    gen_model = og.Model(str(out))
    params = og.GeneratorParams(gen_model)
    params.set_search_options(max_length=len(ids) + 8, min_length=len(ids) + 8, do_sample=False)
    gen = og.Generator(gen_model, params)
    gen.append_tokens(np.array([ids], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    with torch.no_grad():
        want = load_model(trained).model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            eos_token_id=None)[0, len(ids):].tolist()
    assert [int(t) for t in gen.get_sequence(0)[len(ids):]] == want


def test_moe_export_int4_is_qmoe_and_holds_its_integers(tmp_path, moe_dir):
    from edgevlm.export.exporter import ExportConfig, export

    out = tmp_path / "int4"
    r = export(moe_dir, out, ExportConfig(precision="int4"), quiet=True)
    assert r.parity.passed, r.parity.failures
    check = r.parity.graph_check
    assert check.max_abs < check.tolerance and check.tokens_identical
    ops = _ops(out / "onnx" / "decoder_model_merged_q4.onnx")
    assert "QMoE" in ops and "MatMulNBits" in ops


def test_moe_export_refusals(tmp_path, moe_dir):
    from edgevlm.export.exporter import ExportConfig, export

    with pytest.raises(UserError, match="written by the decoder builder only"):
        export(moe_dir, tmp_path / "m", ExportConfig(profile="mobile"), quiet=True)
    with pytest.raises(UserError, match="CUDA's QMoE kernel has no block-wise weights"):
        export(moe_dir, tmp_path / "h", ExportConfig(precision="int4", profile="gpu"),
               quiet=True)
    assert not (tmp_path / "m").exists() and not (tmp_path / "h").exists()


def test_expert_block_size_follows_both_widths():
    from edgevlm.export.builder.linear import expert_block_size

    assert expert_block_size(128, 576, 1536) == 64
    assert expert_block_size(32, 64, 128) == 32
    with pytest.raises(UserError, match="divides both the hidden size 72"):
        expert_block_size(32, 72, 100)
    assert math.gcd(576, 1536) % expert_block_size(128, 576, 1536) == 0
    assert np.log2(expert_block_size(64, 96, 256)).is_integer()


# ---- quantization -----------------------------------------------------------------------------

def test_expert_calibration_sees_the_routed_tokens(moe_dir, shapes_dir):
    """Linearized, each expert's Linears collect Hessians over exactly the real tokens the
    router sends them: over the experts, top_k times the layer's real tokens."""
    from edgevlm.data import Collator, load_samples
    from edgevlm.models.moe import linearize
    from edgevlm.quant.calibrate import decoder_layers, layer_stats, linears, prepare

    loaded = load_model(moe_dir)
    x = _inputs(loaded)
    with torch.no_grad():
        before = loaded.model(**x).logits
    assert linearize(loaded.model) == 1
    with torch.no_grad():
        assert torch.equal(before, loaded.model(**x).logits)  # same function, same order
    samples = load_samples(shapes_dir / "train.json")[:6]
    batch = Collator(loaded.processor, loaded.num_image_tokens, 256)(samples)
    calib = prepare(loaded.model, [batch])
    layer = decoder_layers(loaded.model)[0]
    targets = linears(layer, "l0", ())
    assert not any("shared_expert" in n for n in targets)
    stats, _ = layer_stats(layer, calib.hidden, calib.layer_kwargs[0], calib.masks, targets)
    real = int(calib.masks[0].sum())
    gate = [stats[f"l0.mlp.experts.{e}.gate_proj"].tokens for e in range(4)]
    down = [stats[f"l0.mlp.experts.{e}.down_proj"].tokens for e in range(4)]
    assert sum(gate) == sum(down) == 2 * real and all(0 < g < real for g in gate)
    assert stats["l0.self_attn.q_proj"].tokens == real


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "qvlm"])
def test_quantized_moe_checkpoint_round_trips_into_qmoe(tmp_path, moe_dir, shapes_dir, method):
    """quantize -> a compressed-tensors checkpoint with one packed Linear per expert projection,
    which transformers loads back into the fused experts holding exactly the integers; the int4
    export carries the same integers into QMoE (graph held to that model)."""
    from edgevlm.export.exporter import ExportConfig, export
    from edgevlm.quant.api import quantize
    from edgevlm.quant.primitives import QuantConfig

    out = tmp_path / method
    r = quantize(moe_dir, out, QuantConfig(method=method, group_size=32, calib_samples=8),
                 calib=shapes_dir / "train.json")
    assert r.report["moe_layers"] == 1
    names = [n for n in r.weights if ".experts." in n]
    assert len(names) == 4 * 3
    back = load_model(out, dequantize=True).model.model.language_model.layers[0].mlp.experts
    inter = back.down_proj.shape[2]
    for e in range(4):
        gate = r.weights[f"model.language_model.layers.0.mlp.experts.{e}.gate_proj"]
        down = r.weights[f"model.language_model.layers.0.mlp.experts.{e}.down_proj"]
        assert torch.equal(back.gate_up_proj[e, :inter], gate.dequantize())
        assert torch.equal(back.down_proj[e], down.dequantize())
    ex = export(out, tmp_path / f"{method}_int4", ExportConfig(precision="int4"), quiet=True)
    assert ex.parity.passed, ex.parity.failures
    assert ex.parity.graph_check.max_abs < 1e-5  # the checkpoint's integers, exactly
    manifest = json.loads((tmp_path / f"{method}_int4" / "edgevlm.json").read_text())
    assert manifest["int4_source"] == "checkpoint"


def test_runtime_names_the_onnxruntime_that_has_the_moe_kernel(tmp_path):
    """A graph whose MoE node has no kernel in this onnxruntime (here: bfloat16, which the CPU
    build does not implement) is refused with the op and the release to install."""
    from onnx import TensorProto, helper, save

    from edgevlm.runtime.session import open_session, resolve

    e, d, i = 2, 4, 4
    inits = [helper.make_tensor("fc1", TensorProto.BFLOAT16, (e, 2 * i, d), [0] * (2 * e * i * d)),
             helper.make_tensor("fc2", TensorProto.BFLOAT16, (e, d, i), [0] * (e * d * i))]
    node = helper.make_node("MoE", ["x", "r", "fc1", "", "fc2"], ["y"], domain="com.microsoft",
                            k=1, activation_type="swiglu", swiglu_fusion=1)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [3, d]),
                      helper.make_tensor_value_info("r", TensorProto.BFLOAT16, [3, e])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [3, d])], inits)
    path = tmp_path / "moe.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                 helper.make_opsetid("com.microsoft", 1)]),
         str(path))
    with pytest.raises(UserError, match=r"uses onnxruntime's MoE op \(a mixture-of-experts FFN\)"
                       r".*install onnxruntime >= 1\.27\.1"):
        open_session(path, resolve("cpu"))


def test_upcycling_a_smolvlm_keeps_its_function(tokenizer, shapes_dir):
    """The MoE text model is a variant inside a family: Idefics3's shell upcycles as LLaVA's."""
    from edgevlm.data import Collator, load_samples
    from edgevlm.models import PRESETS

    dense = init_model(PRESETS["tiny-smolvlm"], copy.deepcopy(tokenizer), seed=0)
    up = upcycle(dense)
    assert type(up.model.model.text_model).__name__ == "Qwen2MoeModel"
    batch = Collator(dense.processor, dense.num_image_tokens, 512)(
        load_samples(shapes_dir / "eval.json")[:2])
    batch = {k: v for k, v in batch.items() if v is not None and k != "labels"}
    with torch.no_grad():
        diff = (dense.model(**batch).logits - up.model(**batch).logits).abs().max()
    assert diff < 1e-5


def test_llava_mod_resume_keeps_finished_stages(tmp_path, shapes_dir, micro_model_dir,
                                                teacher_dir):
    from edgevlm.distill.mod import ModConfig, distill_mod
    from edgevlm.train import TrainConfig

    out, data = tmp_path / "mod", shapes_dir / "train.json"
    common = dict(train=TrainConfig(steps=2, batch_size=4, warmup=1, save_every=100, lr=1e-4))
    distill_mod(teacher_dir, micro_model_dir, data, out,
                ModConfig(stages="dense,upcycle", **common), quiet=True)
    before = (out / "upcycle" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(UserError, match="already exists; pass --resume"):
        distill_mod(teacher_dir, micro_model_dir, data, out, ModConfig(**common), quiet=True)
    r = distill_mod(teacher_dir, micro_model_dir, data, out,
                    ModConfig(stages="dense,upcycle,sparse", **common), resume=True, quiet=True)
    assert [(s.stage, s.skipped) for s in r.stages] == [("dense", True), ("upcycle", True),
                                                        ("sparse", False)]
    assert (out / "upcycle" / "model.safetensors").stat().st_mtime_ns == before
    assert load_model(out / "final").model.config.text_config.model_type == "qwen2_moe"


@pytest.mark.slow
def test_two_process_llava_mod(tmp_path, shapes_dir, micro_model_dir, teacher_dir):
    """Every stage under torchrun (a 2-process gloo group): the losses reach the wrapped model's
    routers, the upcycle is written once, the pairs are built on each rank alike."""
    import os

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc_per_node", "2", "--master_port", "29561", "-m", "edgevlm.cli",
           "distill", "--recipe", "llava-mod", "--teacher", str(teacher_dir), "--student",
           str(micro_model_dir), "--data", str(shapes_dir / "train.json"), "--out", str(out),
           "--steps", "3", "--batch-size", "2", "--warmup", "1", "--save-every", "2", "--quiet"]
    subprocess.run(cmd, check=True, env=env, timeout=300)
    report = json.loads((out / "distill.json").read_text())
    assert [s["stage"] for s in report["stages"]] == ["dense", "upcycle", "sparse", "pref"]
    assert json.loads((out / "sparse" / "train_processes.json").read_text())[
        "num_processes"] == 2
    log = json.loads((out / "sparse" / "train_log.json").read_text())
    assert len(log) == 3 and all(h["aux"] > 0 and h["kd"] >= 0 for h in log)
    assert load_model(out / "final").model.config.text_config.model_type == "qwen2_moe"


@pytest.mark.slow
def test_an_expert_no_calibration_token_reaches_is_rounded_to_nearest(tmp_path, micro_model_dir,
                                                                      shapes_dir):
    """With 32 random experts and top-1 routing some expert gets no calibration token: it has
    no Hessian, and quantize ended in a KeyError (benchmarks/distill/mod_quant.py, issue 33).
    Such an expert is rounded to nearest, says so in the report, and the rest is GPTQ's."""
    from edgevlm.models import create
    from edgevlm.models.moe import MoESpec
    from edgevlm.quant import QuantConfig, quantize, rtn

    moe = tmp_path / "moe32"
    create(tmp_path / "student", preset="tiny-student", tokenizer_from=micro_model_dir)
    upcycle_dir(tmp_path / "student", moe, MoESpec(experts=32, top_k=1, init="random"))
    cfg = QuantConfig(method="gptq", group_size=32, calib_samples=8)
    r = quantize(moe, tmp_path / "q", cfg, calib=shapes_dir / "train.json")
    unrouted = {n: rec for n, rec in r.report["layers"].items()
                if rec.get("calibration_tokens") == 0}
    assert unrouted and all(".experts." in n for n in unrouted)
    assert len(unrouted) < len([n for n in r.report["layers"] if ".experts." in n])
    from edgevlm.models.moe import linearize

    floats = load_model(moe).model
    linearize(floats)
    modules = dict(floats.named_modules())
    for name in unrouted:
        W = modules[name].weight.detach().float()
        assert torch.equal(r.weights[name].q, rtn.quantize_weight(W, cfg.for_layer(name)).q)
