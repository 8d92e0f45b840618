"""What must hold before a distillation starts: teacher and student tokenize identically.

KL between two models' vocab distributions is only meaningful when token i means the same
thing to both and the image occupies the same positions; each check names what differs.
"""

from __future__ import annotations

import json
import logging

from edgevlm.errors import UserError
from edgevlm.models import LoadedModel, read_config

log = logging.getLogger(__name__)

STAGE_ORDER = ("dpt", "sft", "dft")


def parse_stages(stages, order: tuple[str, ...] = STAGE_ORDER,
                 other: str | None = None) -> tuple[str, ...]:
    """"dpt,sft,dft" (or a sequence) -> a checked tuple in running order. `order`: the
    recipe's stages; `other`: a hint for a name from another recipe."""
    names = [s.strip().lower() for s in (stages.split(",") if isinstance(stages, str)
                                         else stages) if s.strip()]
    if not names:
        raise UserError(f"stages is empty; give a subset of {','.join(order)}")
    for s in names:
        if s not in order:
            raise UserError(f"unknown stage {s!r}; stages are {', '.join(order)}"
                            + (f" ({other})" if other else ""))
    if len(set(names)) != len(names):
        raise UserError(f"stages {','.join(names)} name a stage twice; give each once")
    ranks = [order.index(s) for s in names]
    if ranks != sorted(ranks):
        raise UserError(f"stages {','.join(names)} are in an impossible order: each stage "
                        f"starts from the previous one's weights, so they run "
                        f"{' -> '.join(order)}; give e.g. "
                        f"{','.join(sorted(names, key=order.index))}")
    return tuple(names)


def check_llava(model_dir, role: str) -> dict:
    """config.json of `model_dir`, or a UserError that says which model (teacher/student)."""
    try:
        return read_config(model_dir)
    except UserError as e:
        raise UserError(f"{role}: {e}") from e


def _tokenizer_spec(tok) -> dict:
    spec = json.loads(tok.backend_tokenizer.to_str())
    return {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}


def check_pair(teacher: LoadedModel, student: LoadedModel) -> list[str]:
    """Raise a UserError naming the first thing that differs; return warnings."""
    from edgevlm.families import family_of

    t_family, s_family = family_of(teacher.model).name, family_of(student.model).name
    if t_family != s_family:
        raise UserError(f"the teacher is of the {t_family} family and the student of the "
                        f"{s_family} family; "
                        "distillation matches their image tokens one to one, so both must be "
                        f"of one family: make the student with edgevlm init --preset of the "
                        f"{t_family} family and --tokenizer-from TEACHER")
    tv = teacher.model.config.text_config.vocab_size
    sv = student.model.config.text_config.vocab_size
    if tv != sv:
        raise UserError(f"teacher and student vocabulary sizes differ (teacher {tv}, student "
                        f"{sv}); the student must share the teacher's tokenizer (edgevlm init "
                        "--tokenizer-from TEACHER)")
    tt, st = teacher.processor.tokenizer, student.processor.tokenizer
    t_vocab, s_vocab = tt.get_vocab(), st.get_vocab()
    if t_vocab != s_vocab:
        diff = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        raise UserError("teacher and student tokenizer files differ: their vocabularies map "
                        f"tokens to different ids (e.g. {', '.join(repr(k) for k, _ in diff)}); "
                        "make the student with edgevlm init --tokenizer-from TEACHER")
    t_spec, s_spec = _tokenizer_spec(tt), _tokenizer_spec(st)
    for key in t_spec:
        if t_spec[key] != s_spec[key]:
            raise UserError(f"teacher and student tokenizer files differ in {key!r}, so the "
                            "same text tokenizes differently; make the student with "
                            "edgevlm init --tokenizer-from TEACHER")
    if teacher.num_image_tokens != student.num_image_tokens:
        raise UserError(f"teacher and student image token counts differ (teacher "
                        f"{teacher.num_image_tokens}, student {student.num_image_tokens} per "
                        "image); give the student the teacher's vision image_size, patch_size "
                        "and vision_feature_select_strategy")
    # both see the student's pixel inputs; idefics3 also tiles by these settings
    tiling = ("size", "max_image_size", "do_image_splitting")
    t_img, s_img = teacher.processor.image_processor, student.processor.image_processor
    for key in tiling:
        if getattr(t_img, key, None) != getattr(s_img, key, None):
            raise UserError(f"teacher and student preprocess images differently ({key}: teacher "
                            f"{getattr(t_img, key, None)}, student {getattr(s_img, key, None)}); "
                            "give the student the teacher's image processor settings")
    if teacher.image_token_id != student.image_token_id:
        raise UserError(f"teacher and student image token ids differ (teacher "
                        f"{teacher.image_token_id}, student {student.image_token_id}); set the "
                        "student's image_token_index to the teacher's")
    warnings = []
    nt = sum(p.numel() for p in teacher.model.parameters())
    ns = sum(p.numel() for p in student.model.parameters())
    if ns > nt:
        msg = (f"the student ({ns / 1e6:.2f}M parameters) is larger than the teacher "
               f"({nt / 1e6:.2f}M); distillation usually goes from large to small")
        log.warning(msg)
        warnings.append(msg)
    return warnings
