"""`distill --pref-data PAIRS.json` reads images from the pairs file's folder (or --image-root)
only, as LLaVA data does, symlinks resolved; and the whole file is checked before any stage
trains (issue 33): an absolute or ../ path, a symlink out, a file that is not an image or a
path that cannot be resolved is one line naming the entry."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from edgevlm.distill.preference import read_pairs
from edgevlm.errors import UserError

PAIR = {"question": "What colour is the square?", "chosen": "red", "rejected": "blue"}


@pytest.fixture
def folder(tmp_path, shapes_dir):
    """A pairs folder holding one image, beside an outside image it must not read."""
    inside = tmp_path / "pairs"
    inside.mkdir()
    image = sorted((shapes_dir / "images").iterdir())[0]
    shutil.copy(image, inside / "in.png")
    shutil.copy(image, tmp_path / "outside.png")
    return inside


def write(folder, *images) -> object:
    path = folder / "pairs.json"
    path.write_text(json.dumps([{**PAIR, "image": im} for im in images]))
    return path


def test_pair_images_inside_the_folder_are_read(folder):
    (pair,) = read_pairs(write(folder, "in.png"))
    assert pair.image == (folder / "in.png").resolve() and pair.question.startswith("<image>")
    (pair,) = read_pairs(write(folder, str(folder / "in.png")))  # absolute, but inside
    assert pair.image == (folder / "in.png").resolve()


@pytest.mark.parametrize("image", ["../outside.png", "ABSOLUTE", "link.png", "sub/../../x.png"])
def test_pair_images_may_not_leave_the_folder(folder, image):
    (folder / "link.png").symlink_to(folder.parent / "outside.png")
    if image == "ABSOLUTE":
        image = str(folder.parent / "outside.png")
    path = write(folder, "in.png", image)
    with pytest.raises(UserError, match=rf"pairs\.json entry 1: image path '{image}' leaves "
                       rf"the data folder {folder}; keep images inside it or pass --image-root"):
        read_pairs(path)


def test_image_root_is_the_folder_pairs_are_confined_to(folder):
    path = write(folder, "outside.png")
    (pair,) = read_pairs(path, image_root=folder.parent)
    assert pair.image == (folder.parent / "outside.png").resolve()
    with pytest.raises(UserError, match="leaves the data folder"):
        read_pairs(write(folder, "../../outside.png"), image_root=folder.parent)
    with pytest.raises(UserError, match="--image-root .* is not a folder"):
        read_pairs(path, image_root=folder / "in.png")


@pytest.mark.parametrize("image, named", [
    ("notes.png", r"entry 1: cannot read image .*notes\.png .*; replace or remove that pair"),
    ("a\0b.png", r"entry 1: image path 'a\\x00b\.png' cannot be resolved"),
    ("", r"entry 1: 'image' is ''"),
    (["in.png", "in.png"], r"entry 1: 'image' lists 2 images"),
])
def test_bad_pair_images_are_one_line(folder, image, named):
    (folder / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match=named):
        read_pairs(write(folder, "in.png", image))


def test_a_bad_pairs_file_is_refused_before_any_stage_trains(folder, teacher_dir,
                                                             micro_model_dir, shapes_dir,
                                                             tmp_path):
    """The pairs are the last stage's data: every entry is checked before the dense stage
    starts (and before the teacher loads), not after three stages trained."""
    from edgevlm.distill.mod import ModConfig, distill_mod

    pairs = write(folder, *["in.png"] * 50, "../outside.png")
    t0 = time.time()
    with pytest.raises(UserError, match="entry 50: image path '../outside.png' leaves"):
        distill_mod(teacher_dir, micro_model_dir, shapes_dir / "train.json", tmp_path / "mod",
                    ModConfig(), pref_data=pairs, quiet=True)
    assert time.time() - t0 < 2 and not (tmp_path / "mod").exists()
