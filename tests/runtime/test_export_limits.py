"""Issue 33's runtime findings, each reproduced on the tiny fp32 export and held to one line:
threads bounded by the machine, edgevlm.json sizes checked before anything is allocated, its
fields type-checked, every file the reader opens confined to the export, the mobile rope table
read from its header (never unpickled), and the stream showing exactly `text`."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from edgevlm.errors import UserError
from edgevlm.runtime import VLM
from edgevlm.runtime.contract import MANIFEST
from edgevlm.runtime.limits import MAX_IMAGE_EDGE, usable_cores
from edgevlm.runtime.manifest import read_export
from tests.reliability.test_outputs import run
from tests.tools import without_notes


def copy(export_dir, dst):
    shutil.copytree(export_dir, dst)
    return dst


def edit(root, **changes):
    """Set edgevlm.json fields: a key "a.b" sets m["a"]["b"]; None removes the key."""
    m = json.loads((root / MANIFEST).read_text())
    for key, value in changes.items():
        *parents, last = key.split(".")
        node = m
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    (root / MANIFEST).write_text(json.dumps(m))
    return root


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert text and "\n" not in text.strip(), text
    return text


# -- 1. threads -----------------------------------------------------------------------------


def test_threads_past_the_cores_are_refused_before_any_session_opens(export_dir):
    cores = usable_cores()
    with pytest.raises(UserError) as e:
        VLM.load(export_dir, provider="cpu", threads=100_000)
    assert f"more than the {cores} CPU cores" in one_line(e) and "--threads" in str(e.value)
    assert VLM.load(export_dir, provider="cpu", threads=cores).info.num_layers == 2


def test_every_session_bounds_threads_and_bench_takes_the_same_check(export_dir):
    from edgevlm.bench.harness import BenchConfig
    from edgevlm.runtime import session

    chosen = session.resolve("cpu")
    graph = export_dir / "onnx" / "embed_tokens.onnx"
    with pytest.raises(UserError, match="CPU cores"):
        session.open_session(graph, chosen, threads=100_000)
    with pytest.raises(UserError, match="CPU cores"):
        BenchConfig(threads=100_000)
    with pytest.raises(UserError, match="threads=True"):
        session.SessionConfig("cpu", threads=True)


def test_run_threads_100000_is_one_line(export_dir):
    code, text = run("run", export_dir, "--prompt", "hi", "--provider", "cpu",
                     "--threads", "100000")
    assert code == 2, text
    lines = without_notes(text).splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--threads" in lines[0], text


# -- 2. sizes from edgevlm.json ----------------------------------------------------------------


@pytest.mark.parametrize("context", [2_000_000, 10**12])
def test_max_context_past_max_position_embeddings_is_refused(export_dir, tmp_path, context):
    root = edit(copy(export_dir, tmp_path / "x"), **{"decoder.max_context": context})
    with pytest.raises(UserError) as e:
        VLM.load(root, provider="cpu")
    assert (f"decoder.max_context={context} is past the model's max_position_embeddings 256"
            in one_line(e))


def test_kv_cache_past_the_machines_memory_is_refused(export_dir, tmp_path):
    # 2 layers x 2 x 1 kv head x 32 x 10^12 positions x 4 bytes: 512 TB, on any machine
    root = edit(copy(export_dir, tmp_path / "x"), max_position_embeddings=10**12,
                **{"decoder.max_context": 10**12})
    with pytest.raises(UserError) as e:
        read_export(root)
    assert "KV cache, more than this machine's" in one_line(e)
    assert "--max-context" in str(e.value)


@pytest.mark.parametrize("size", [{"height": 100_000, "width": 100_000},
                                  {"shortest_edge": 100_000}])
def test_image_sizes_past_4096_px_are_refused_before_pil(export_dir, tmp_path, size):
    root = edit(copy(export_dir, tmp_path / "x"), **{"image_processor.size": size})
    with pytest.raises(UserError) as e:
        read_export(root)
    assert f"is over the {MAX_IMAGE_EDGE} px" in one_line(e)


def test_image_size_other_than_the_vision_encoders_is_refused(export_dir, tmp_path):
    root = edit(copy(export_dir, tmp_path / "x"),
                **{"image_processor.size": {"height": 32, "width": 32}})
    with pytest.raises(UserError) as e:
        read_export(root)
    assert "makes 32x32 px images but the vision encoder takes 48x48" in one_line(e)


@pytest.mark.parametrize("layers, match", [
    (3, "num_layers=3 but graph decoder_model_merged.onnx takes the past of 2 layers"),
    (10**9, "num_layers 1000000000 x 2 x num_kv_heads 1 x head_dim 32 x 4 bytes per position"),
])
def test_num_layers_past_the_graph_is_refused_before_names_are_made(export_dir, tmp_path,
                                                                    layers, match):
    root = edit(copy(export_dir, tmp_path / "x"), num_layers=layers)
    with pytest.raises(UserError) as e:
        VLM.load(root, provider="cpu")
    assert match in one_line(e)


def test_eos_past_the_vocabulary_is_refused(export_dir, tmp_path):
    root = edit(copy(export_dir, tmp_path / "x"), eos_token_id=1_000_000)
    with pytest.raises(UserError) as e:
        VLM.load(root, provider="cpu")
    assert "eos_token_id 1000000 is past the model's 385-token vocabulary" in one_line(e)


# -- 3. fields of the wrong type ---------------------------------------------------------------


@pytest.mark.parametrize("key, value, named", [
    ("decoder.max_context", "4096", "decoder.max_context"),
    ("decoder.activations", ["fp16"], "decoder.activations"),
    ("static_shapes", [1], "static_shapes"),
    ("token_select", "visionzip", "token_select"),
    ("eos_token_id", "</s>", "eos_token_id"),
    ("eos_token_id", [2, None], "eos_token_id"),
    ("rope_file", 5, "rope_file"),
    ("components.decoder_model_merged.file", 5, "components.decoder_model_merged.file"),
    ("components.vision_encoder.precision", ["fp32"], "components.vision_encoder.precision"),
    ("profile", ["mobile"], "profile"),
    ("family", {"name": "llava"}, "family"),
    ("num_layers", True, "num_layers"),
    ("image_token_id", -3, "image_token_id"),
    ("chat_template", 7, "chat_template"),
    ("image_processor", [48], "image_processor"),
    ("image_processor.image_mean", "abc", "image_mean"),
    ("image_processor.resample", "bicubic", "resample"),
    ("image_processor.rescale_factor", "1/255", "rescale_factor"),
    ("image_processor.image_processor_type", ["x"], "image_processor_type"),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_it(export_dir, tmp_path, key, value,
                                                         named):
    root = edit(copy(export_dir, tmp_path / "x"), **{key: value})
    with pytest.raises(UserError) as e:
        VLM.load(root, provider="cpu")
    assert named in one_line(e)


# -- 4. every file the reader opens stays inside ---------------------------------------------

READ = ["edgevlm.json", "tokenizer.json", "chat_template.jinja", "tokenizer_config.json",
        "config.json", "generation_config.json", "processor_config.json",
        "preprocessor_config.json"]


@pytest.mark.parametrize("name", READ)
def test_a_file_symlinked_from_outside_the_export_is_refused(export_dir, tmp_path, name):
    root = copy(export_dir, tmp_path / "x")
    if name == "preprocessor_config.json":  # read when the other two give no settings
        edit(root, image_processor=None)
        (root / "processor_config.json").unlink()
    if name == "chat_template.jinja":  # the finding: an outside file became the template
        edit(root, chat_template=None)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / name).rename(outside / name)
    (root / name).symlink_to(outside / name)
    with pytest.raises(UserError) as e:
        VLM.load(root, provider="cpu")
    assert "outside the export folder" in one_line(e) and name in str(e.value)


def test_a_symlink_that_stays_inside_the_export_is_read(export_dir, tmp_path):
    root = edit(copy(export_dir, tmp_path / "x"), chat_template=None)
    (root / "chat_template.jinja").rename(root / "onnx" / "template.jinja")
    (root / "chat_template.jinja").symlink_to(root / "onnx" / "template.jinja")
    assert read_export(root).chat_template == (root / "onnx" / "template.jinja").read_text()


# -- 5. the mobile rope table ----------------------------------------------------------------


def mobile(export_dir, tmp_path, table: np.ndarray | None = None, *, pickled=None):
    root = edit(copy(export_dir, tmp_path / "m"), profile="mobile", rope_file="onnx/rope.npy",
                **{"static_shapes.context": 64})
    if pickled is not None:
        np.save(root / "onnx" / "rope.npy", pickled, allow_pickle=True)
    else:
        np.save(root / "onnx" / "rope.npy", table)
    return root


class _Marker:
    """Unpickling it writes a file: proof that the object array was (not) loaded."""

    path = ""

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_an_object_rope_table_is_refused_without_unpickling(export_dir, tmp_path):
    marker = _Marker()
    marker.path = str(tmp_path / "unpickled")
    table = np.empty(2, dtype=object)
    table[:] = [marker, marker]
    root = mobile(export_dir, tmp_path, pickled=table)
    with pytest.raises(UserError) as e:
        read_export(root)
    assert "holds a object array" in one_line(e) and "floating point" in str(e.value)
    assert not os.path.exists(marker.path)


@pytest.mark.parametrize("table, match", [
    (np.zeros((2, 64, 16), np.float32), r"has shape \(2, 64, 16\); the decoder needs "
                                        r"\(2, 64, 32\)"),
    (np.zeros((2, 64, 32), np.int64), "holds a int64 array"),
])
def test_a_rope_table_of_the_wrong_shape_or_kind_is_refused(export_dir, tmp_path, table, match):
    with pytest.raises(UserError, match=match):
        read_export(mobile(export_dir, tmp_path, table))


def test_a_truncated_rope_table_is_refused_and_a_whole_one_is_read(export_dir, tmp_path):
    root = mobile(export_dir, tmp_path, np.zeros((2, 64, 32), np.float32))
    assert read_export(root).rope_file == root / "onnx" / "rope.npy"
    path = root / "onnx" / "rope.npy"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="is truncated"):
        read_export(root)


# -- 7. the stream shows what text holds -----------------------------------------------------


def test_the_joined_stream_is_the_text(vlm, eval_samples):
    differs = 0
    for s in eval_samples[:2]:
        for seed in range(12):
            kw = dict(max_new_tokens=12, temperature=1.5, seed=seed)
            result = vlm.generate(s.image, s.question, **kw)
            assert "".join(vlm.stream(s.image, s.question, **kw)) == result.text
            differs += vlm.tokenizer.decode(result.token_ids) != result.text
            stop = dict(kw, stop=["e"])
            assert "".join(vlm.stream(s.image, s.question, **stop)) == \
                vlm.generate(s.image, s.question, **stop).text
    assert differs, "no answer had surrounding whitespace: the test would prove nothing"


@pytest.mark.parametrize("pieces", [
    [" ", " a", " ", "b ", " \n"],
    ["\n\n", "", "x", "  y", "\t", ""],
    ["   "],
    ["a b", "  ", "c"],
])
def test_trim_streams_what_strip_leaves(pieces):
    from edgevlm.runtime.sampling import Trim

    trim = Trim()
    assert "".join(trim.feed(p) for p in pieces) == "".join(pieces).strip()
