"""edgevlm.runtime and `edgevlm run` work where torch and transformers cannot be imported."""

from __future__ import annotations

import json
import subprocess
import sys

# Runs in a fresh interpreter: any import of torch/transformers (or their submodules) fails,
# as it would on a device with only `pip install edgevlm`.
SCRIPT = r"""
import importlib.abc, json, sys

BLOCKED = ("torch", "transformers", "torchvision", "accelerate")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked in the lean-import test")
        return None

sys.meta_path.insert(0, Block())
export_dir, image, report = sys.argv[1:4]

from edgevlm.runtime import VLM

vlm = VLM.load(export_dir, provider="auto")
result = vlm.generate(image, "What color is the circle?", max_new_tokens=5)
pieces = list(vlm.stream(image, "What color is the circle?", max_new_tokens=5))

from edgevlm import cli

sys.argv = ["edgevlm", "run", export_dir, "--image", image, "--prompt", "What?",
            "--max-new-tokens", "3", "--json"]
try:
    cli.main()
except SystemExit as e:
    assert not e.code, e.code
import importlib, pkgutil
import edgevlm.bench
import edgevlm.runtime

modules = [m.name for m in pkgutil.iter_modules(edgevlm.runtime.__path__, "edgevlm.runtime.")]
modules += [m.name for m in pkgutil.iter_modules(edgevlm.bench.__path__, "edgevlm.bench.")
            if m.name != "edgevlm.bench.torch_target"]  # the torch reference: model folders
for name in modules:  # every runtime and bench module imports without torch or the toolkit
    importlib.import_module(name)

loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
toolkit = sorted(m for m in sys.modules if m in ("edgevlm.bench.torch_target", "edgevlm.models",
                                                 "edgevlm.quant", "edgevlm.train"))
with open(report, "w") as f:
    json.dump({"ids": list(result.token_ids), "provider": vlm.provider,
               "stream": "".join(pieces).strip() == result.text, "loaded": loaded,
               "toolkit": toolkit, "modules": modules}, f)
"""


def test_runtime_runs_without_torch(export_dir, eval_samples, vlm, tmp_path):
    image = str(eval_samples[0].image)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(export_dir), image,
                           str(tmp_path / "report.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["loaded"] == []
    assert report["toolkit"] == []  # the runtime imports no toolkit module (DESIGN.md)
    assert {"edgevlm.bench.harness", "edgevlm.bench.report", "edgevlm.bench.plan",
            "edgevlm.runtime.model",
            "edgevlm.runtime.session"} <= set(report["modules"])
    assert report["stream"]
    expected = vlm.generate(image, "What color is the circle?", max_new_tokens=5).token_ids
    assert report["ids"] == list(expected)
    assert json.loads(proc.stdout)["timings"]["n_new_tokens"] == 3  # `edgevlm run --json`
