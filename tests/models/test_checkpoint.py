"""A user's checkpoint dir is refused at validation, naming what is wrong, before anything starts."""

from __future__ import annotations

import json
import shutil

import pytest

from sparrow_megatron.config import JobConfig, validate
from sparrow_megatron.errors import UserError
from sparrow_megatron.loader import apply_overrides
from sparrow_megatron.models.checkpoint import checkpoint_problems, tokenizer_size
from tests.recipes import fixtures


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    return fixtures.make_user_qwen3(tmp_path_factory.mktemp("qwen3") / "Qwen3-tiny")


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _validate(model):
    validate(apply_overrides(JobConfig(), [f"model.hf_dir={model}"]))


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_the_user_checkpoint_passes(user_model):
    assert checkpoint_problems(user_model, json.loads((user_model / "config.json").read_text())) == []
    _validate(user_model)


def test_not_qwen3_names_the_model_type(user_model, tmp_path):
    model = _copy(user_model, tmp_path)
    _edit(model / "config.json", model_type="llama")
    with pytest.raises(UserError) as err:
        _validate(model)
    assert "field 'model.hf_dir'" in str(err.value) and "model_type is 'llama', not 'qwen3'" in str(err.value)


def test_tokenizer_without_chat_template(user_model, tmp_path):
    model = _copy(user_model, tmp_path)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="the tokenizer has no chat template"):
        _validate(model)


def test_vocabulary_larger_than_the_embedding(user_model, tmp_path):
    model = _copy(user_model, tmp_path)
    size = tokenizer_size(json.loads((model / "tokenizer.json").read_text()))
    _edit(model / "config.json", vocab_size=size - 10)
    with pytest.raises(UserError) as err:
        _validate(model)
    assert f"ids up to {size - 1} but config.json vocab_size is {size - 10}" in str(err.value)


def test_a_config_only_dir_is_not_judged_on_what_it_lacks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert checkpoint_problems(tmp_path, {"num_hidden_layers": 2}) == []
