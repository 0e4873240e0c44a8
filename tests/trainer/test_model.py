import json
import shutil

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.model import check_parallel_split, read_qwen3_config
from tests.trainer.policy_args import make_policy


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_reads_qwen3_shape_from_config(tiny_tied, tiny_untied):
    arch = read_qwen3_config(tiny_tied)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (
        4,
        64,
        4,
        2,
        16,
    )
    assert arch.rope_theta == 1e6 and arch.tie_word_embeddings
    assert not read_qwen3_config(tiny_untied).tie_word_embeddings


def test_config_that_is_not_qwen3_is_refused(tiny_tied, tmp_path):
    d = _copy_with_config(tiny_tied, tmp_path / "llama", model_type="llama")
    with pytest.raises(UserError, match="model_type.*'llama'"):
        make_policy(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json:1: not valid JSON"):
        read_qwen3_config(d)


def test_tp_must_divide_heads_and_pp_layers(tiny_tied):
    arch = read_qwen3_config(tiny_tied)
    with pytest.raises(UserError, match="num_attention_heads=4 is not divisible by tp=3"):
        check_parallel_split(arch, tp=3, pp=1)
    with pytest.raises(UserError, match="num_key_value_heads=2 is not divisible by tp=4"):
        check_parallel_split(arch, tp=4, pp=1)
    with pytest.raises(UserError, match="num_hidden_layers=4 is not divisible by pp=3"):
        check_parallel_split(arch, tp=1, pp=3)
    with pytest.raises(UserError, match="tp=3"):
        make_policy(str(tiny_tied), tp=3)


def test_bad_trainer_settings_are_named_before_anything_is_built():
    with pytest.raises(UserError, match="field 'trainer.tp': must be >= 1"):
        make_policy("x", tp=0)
    with pytest.raises(UserError, match="model_dir is empty"):
        make_policy("")
