"""A chat template that cannot render ends in one line on the torch side too (issue 33): in
training batches, evaluation prompts and the export's reference, naming the template and the
fix, never a jinja or transformers traceback."""

from __future__ import annotations

import copy

import pytest

from edgevlm.data import Collator, load_samples
from edgevlm.errors import UserError
from edgevlm.evaluate import prompt_text
from edgevlm.models import load_model

BROKEN = {
    "raises": "{{ raise_exception('no system turns here') }}",
    "undefined call": "{% for m in messages %}{{ m.content.nope() }}{% endfor %}",
    "syntax": "{% for m in messages %}{{ m.content }",
    "not a prefix": "{% for m in messages|reverse %}{{ m.role }}: {{ m.content }}\n{% endfor %}",
}


@pytest.fixture(scope="module")
def loaded(micro_model_dir):
    return load_model(micro_model_dir)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_template_is_one_line(name, loaded, shapes_dir):
    processor = copy.deepcopy(loaded.processor)
    processor.tokenizer.chat_template = BROKEN[name]
    sample = load_samples(shapes_dir / "train.json")[0]
    collate = Collator(processor, loaded.num_image_tokens)
    with pytest.raises(UserError) as error:
        collate.encode(sample)
    if name == "not a prefix":
        assert "does not begin with its earlier turns" in str(error.value)
        return
    assert str(error.value).startswith("the model's chat template cannot render this "
                                       "conversation (")
    assert "fix the template in the model folder" in str(error.value)
    with pytest.raises(UserError, match="the model's chat template cannot render"):
        prompt_text(type(loaded)(loaded.model, processor, loaded.image_token_id,
                                 loaded.num_image_tokens), sample)
