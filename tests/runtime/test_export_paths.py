"""No export can make the runtime read a file outside its folder (issue 20, item 2): graphs,
the rope table and every external-data location an export names are checked by edgevlm itself
before a session opens, whatever onnxruntime does."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.paths import external_data_locations


@pytest.fixture
def export_copy(export_dir, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(export_dir, dst)
    (tmp_path / "secret.bin").write_bytes(np.arange(1 << 16, dtype=np.float32).tobytes())
    return dst


def _external_graph(export):
    """The export's graph with external data, and the graph proto (weights left out)."""
    manifest = json.loads((export / "edgevlm.json").read_text())
    name = next(c for c, f in manifest["components"].items() if f.get("external_data"))
    path = export / manifest["components"][name]["file"]
    return path, onnx.load(str(path), load_external_data=False)


def test_locations_are_read_as_onnx_reads_them(export_copy):
    path, model = _external_graph(export_copy)
    theirs = sorted({e.value for t in model.graph.initializer for e in t.external_data
                     if e.key == "location"})
    assert theirs and sorted(set(external_data_locations(path))) == theirs


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_export_is_refused(export_copy, tmp_path, where):
    path, model = _external_graph(export_copy)
    secret = tmp_path / "secret.bin"
    if where == "symlink":
        (path.parent / "link.bin").symlink_to(secret)
    location = {"parent": "../../secret.bin", "absolute": str(secret),
                "symlink": "link.bin"}[where]
    tensor = next(t for t in model.graph.initializer if t.external_data)
    next(e for e in tensor.external_data if e.key == "location").value = location
    path.write_bytes(model.SerializeToString())
    with pytest.raises(UserError, match="outside the export folder|absolute path"):
        VLM.load(export_copy, provider="cpu")


def test_manifest_paths_outside_the_export_are_refused(export_copy, tmp_path):
    manifest = json.loads((export_copy / "edgevlm.json").read_text())
    outside = tmp_path / "evil.onnx"
    shutil.copy(export_copy / manifest["components"]["embed_tokens"]["file"], outside)
    manifest["components"]["embed_tokens"]["file"] = "../evil.onnx"
    (export_copy / "edgevlm.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="graph evil.onnx points to .* outside the export"):
        VLM.load(export_copy, provider="cpu")


def test_a_damaged_graph_is_named(export_copy):
    path, _ = _external_graph(export_copy)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="not a readable ONNX file"):
        VLM.load(export_copy, provider="cpu")
    path.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        VLM.load(export_copy, provider="cpu")


def test_hard_linked_external_data_is_refused(export_copy, tmp_path):
    import os

    path, model = _external_graph(export_copy)
    data = path.parent / next(e.value for t in model.graph.initializer for e in t.external_data
                              if e.key == "location")
    os.link(data, tmp_path / "elsewhere.bin")  # the same bytes, reachable from outside
    with pytest.raises(UserError, match="is a hard link"):
        VLM.load(export_copy, provider="cpu")


def test_a_manifest_that_undercounts_layers_is_named(export_copy):
    manifest = json.loads((export_copy / "edgevlm.json").read_text())
    manifest["num_layers"] -= 1  # the graph still takes the last layer's past
    (export_copy / "edgevlm.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="takes inputs the runtime would not feed.*re-export"):
        VLM.load(export_copy, provider="cpu")
