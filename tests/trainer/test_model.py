import json
import shutil

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer import Policy, TrainerConfig
from sparrow_megatron.trainer.model import (
    LongContext,
    check_parallel_split,
    has_transformer_engine,
    read_qwen3_config,
)


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
        Policy(TrainerConfig(model_dir=str(d)))
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
        Policy(TrainerConfig(model_dir=str(tiny_tied), tp=3))


def test_bad_trainer_config_fields_are_named():
    with pytest.raises(UserError, match="'loss_agg'"):
        TrainerConfig(model_dir="x", loss_agg="sum").validate()
    with pytest.raises(UserError, match="'model_dir'"):
        TrainerConfig().validate()


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(recompute="all"), "'recompute'"),
        (dict(recompute="full", recompute_method="random"), "'recompute_method'"),
        (dict(recompute="full", recompute_num_layers=0), "'recompute_num_layers'"),
        (dict(sequence_parallel=True, tp=1), "'sequence_parallel'"),
        (dict(cp=0), "'cp'"),
        (dict(logprob_chunk_tokens=0), "'logprob_chunk_tokens'"),
    ],
)
def test_bad_long_context_fields_are_named(fields, named):
    with pytest.raises(UserError, match=named):
        TrainerConfig(model_dir="x", **fields).validate()


def test_long_context_settings_map_onto_megatron_fields(tiny_tied):
    arch = read_qwen3_config(tiny_tied)
    assert TrainerConfig(model_dir="x", tp=2).use_sequence_parallel  # on by default when TP > 1
    assert not TrainerConfig(model_dir="x", tp=2, sequence_parallel=False).use_sequence_parallel
    assert not TrainerConfig(model_dir="x").use_sequence_parallel
    full = LongContext(
        sequence_parallel=True, recompute="full", recompute_method="block", recompute_num_layers=2
    )
    fields = full.config_fields(arch, tp=2, pp=1)
    assert fields["sequence_parallel"] and fields["context_parallel_size"] == 1
    assert (fields["recompute_granularity"], fields["recompute_method"], fields["recompute_num_layers"]) == (
        "full",
        "block",
        2,
    )
    selective = LongContext(recompute="selective").config_fields(arch, tp=1, pp=1)
    assert selective["recompute_granularity"] == "selective" and "core_attn" in selective["recompute_modules"]
    assert "recompute_granularity" not in LongContext().config_fields(arch, tp=1, pp=1)
    # 4 layers over pp=2: a checkpoint cannot span more than the stage's 2 layers.
    with pytest.raises(UserError, match=r"'recompute_num_layers' must be in \[1, 2\]"):
        LongContext(recompute="full", recompute_num_layers=3).config_fields(arch, tp=1, pp=2)


@pytest.mark.skipif(has_transformer_engine(), reason="checks the machine without Transformer Engine")
def test_context_parallel_without_transformer_engine_is_a_clear_error(tiny_tied):
    with pytest.raises(UserError, match="'cp' = 2 needs Transformer Engine"):
        Policy(TrainerConfig(model_dir=str(tiny_tied), cp=2))


def test_job_config_long_context_fields_reach_the_trainer(tmp_path):
    from sparrow_megatron.config import JobConfig, apply_overrides
    from sparrow_megatron.loop.run import trainer_config

    overrides = ["trainer.recompute=full", "trainer.recompute_method=block", "trainer.recompute_num_layers=2"]
    overrides += ["trainer.sequence_parallel=false", "trainer.cp=1", "trainer.logprob_chunk_tokens=1024"]
    t = trainer_config(apply_overrides(JobConfig(), overrides), tmp_path)
    assert (t.recompute, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    assert t.sequence_parallel is False and t.cp == 1 and t.logprob_chunk_tokens == 1024
    default = trainer_config(apply_overrides(JobConfig(), ["trainer.tp=2"]), tmp_path)
    assert default.sequence_parallel is None and default.use_sequence_parallel
    with pytest.raises(UserError, match="trainer.recompute"):
        apply_overrides(JobConfig(), ["trainer.recompute=some"])
