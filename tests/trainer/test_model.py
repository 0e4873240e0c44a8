import json
import shutil

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.trainer.config import TrainerConfig
from sparrow_megatron.trainer.model import (
    LongContext,
    check_parallel_split,
    has_transformer_engine,
    read_qwen3_config,
)
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


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.recompute=all", "trainer.recompute"),
        ("trainer.recompute_method=random", "trainer.recompute_method"),
        ("trainer.recompute_num_layers=0", "trainer.recompute_num_layers"),
        ("trainer.sequence_parallel=true", "trainer.sequence_parallel"),
        ("trainer.cp=0", "trainer.cp"),
        ("trainer.logprob_chunk_tokens=0", "trainer.logprob_chunk_tokens"),
    ],
)
def test_bad_long_context_fields_are_named(override, named):
    from sparrow_megatron.config import load_config

    with pytest.raises(UserError, match=f"field '{named}'"):
        load_config(None, [override], check_paths=False)


def test_recompute_layers_beyond_a_pipeline_stage_are_refused_against_the_model(tiny_tied):
    from sparrow_megatron.config import load_config

    # tiny_tied has 4 layers: over pp=2 a stage holds 2.
    overrides = [f"model.hf_dir={tiny_tied}", "trainer.pp=2", "trainer.recompute=full"]
    with pytest.raises(UserError, match="field 'trainer.recompute_num_layers': 3 is more than the 2 layers"):
        load_config(None, [*overrides, "trainer.recompute_num_layers=3"], check_paths=False)
    assert load_config(None, [*overrides, "trainer.recompute_num_layers=2"], check_paths=False)


def test_long_context_settings_map_onto_megatron_fields(tiny_tied):
    arch = read_qwen3_config(tiny_tied)
    assert TrainerConfig(tp=2).use_sequence_parallel  # on by default when TP > 1
    assert not TrainerConfig(tp=2, sequence_parallel=False).use_sequence_parallel
    assert not TrainerConfig().use_sequence_parallel
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
    with pytest.raises(UserError, match=r"'trainer.recompute_num_layers' must be in \[1, 2\]"):
        LongContext(recompute="full", recompute_num_layers=3).config_fields(arch, tp=1, pp=2)


@pytest.mark.skipif(has_transformer_engine(), reason="checks the machine without Transformer Engine")
def test_context_parallel_without_transformer_engine_is_a_clear_error(tiny_tied):
    import torch

    from sparrow_megatron.trainer.model import transformer_config

    arch = read_qwen3_config(tiny_tied)
    want = r"'trainer.cp' = 2: trainer.cp > 1 needs Transformer Engine's attention \(the GPU image"
    with pytest.raises(UserError, match=want):
        transformer_config(arch, 1, 1, LongContext(cp=2), torch.float32)
    # where the model is built: before any process group exists
    with pytest.raises(UserError, match=want):
        make_policy(str(tiny_tied), cp=2)


def test_job_config_long_context_fields_reach_the_trainer(tiny_tied):
    from sparrow_megatron.config import load_config

    overrides = ["trainer.recompute=full", "trainer.recompute_method=block", "trainer.recompute_num_layers=2"]
    overrides += ["trainer.sequence_parallel=false", "trainer.cp=1", "trainer.logprob_chunk_tokens=1024"]
    t = load_config(None, overrides, check_paths=False).trainer
    assert (t.recompute, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)
    assert t.sequence_parallel is False and t.cp == 1 and t.logprob_chunk_tokens == 1024
    # Policy takes the section as it is: its Megatron config carries the recompute settings.
    policy = make_policy(str(tiny_tied), **{f: getattr(t, f) for f in ("recompute", "recompute_method",
                                                                       "recompute_num_layers", "sequence_parallel",
                                                                       "logprob_chunk_tokens")})  # fmt: skip
    c = policy.config
    assert (c.recompute_granularity, c.recompute_method, c.recompute_num_layers) == ("full", "block", 2)
    assert policy.trainer.logprob_chunk_tokens == 1024
    default = load_config(None, ["trainer.tp=2"], check_paths=False).trainer
    assert default.sequence_parallel is None and default.use_sequence_parallel
