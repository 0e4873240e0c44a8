import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from sparrow_megatron.config import (
    JobConfig,
    apply_overrides,
    from_dict,
    load_config,
    load_recipe,
    validate,
)
from sparrow_megatron.errors import UserError
from sparrow_megatron.sparsity.schedule import PRESETS


def _model_dir(tmp_path, heads=16, kv_heads=8, layers=28, max_pos=40960):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps(
            {
                "num_attention_heads": heads,
                "num_key_value_heads": kv_heads,
                "num_hidden_layers": layers,
                "max_position_embeddings": max_pos,
            }
        )
    )
    return d


def test_defaults_are_valid_and_match_the_paper():
    cfg = load_config()
    assert cfg.monitor.tau == 0.86 and cfg.monitor.bin_width == 2000
    assert (cfg.grpo.eps_low, cfg.grpo.eps_high, cfg.grpo.dual_clip, cfg.grpo.tis_cap) == (
        0.2,
        0.28,
        3.0,
        3.0,
    )
    assert cfg.grpo.std == "unbiased" and cfg.grpo.kl_coef == 0.0 and cfg.distill.tis_cap is None
    assert cfg.monitor.signal == "lower"
    assert cfg.rollout.top_k_logprobs == 20
    assert cfg.distill.kl_lambda == 1e-3
    assert cfg.monitor.controller.enabled is False


def test_overrides_are_coerced_to_the_field_types():
    cfg = apply_overrides(
        JobConfig(),
        [
            "rollout.n_samples=16",
            "monitor.tau=0.9",
            "distill.enabled=true",
            "monitor.controller.ladder=512,768,1024",
            "distill.target_modules=[q_proj, k_proj, v_proj]",
            "data.columns={problem: prompt, solution: answer}",
            "rollout.schedule=qwen3-4b-0.86",
            "model.name=0.86",
            "trainer.lr=1e-5",
            "grpo.loss_agg=seq-mean-token-sum",
        ],
    )
    assert cfg.rollout.n_samples == 16 and isinstance(cfg.rollout.n_samples, int)
    assert cfg.monitor.tau == 0.9
    assert cfg.distill.enabled is True
    assert cfg.monitor.controller.ladder == [512, 768, 1024]
    assert cfg.distill.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.data.columns == {"problem": "prompt", "solution": "answer"}
    assert cfg.model.name == "0.86"  # a str field keeps the text as written
    assert cfg.trainer.lr == 1e-5
    assert cfg.grpo.loss_agg == "seq-mean-token-sum"
    validate(cfg)
    # The original is untouched.
    assert JobConfig().rollout.n_samples == 8


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("rollout.n_sample=4", "unknown field 'rollout.n_sample'"),
        ("nope=1", "unknown field 'nope'"),
        ("rollout.n_samples=four", "expected an integer"),
        ("distill.enabled=maybe", "expected a boolean"),
        ("monitor.tau=high", "expected a number"),
        ("grpo.loss_agg=sum", "field 'grpo.loss_agg'"),
        ("rollout=3", "is a section"),
        ("rollout.n_samples.x=3", "has no sub-fields"),
        ("rollout.n_samples", "expected key.sub=value"),
        ("monitor.controller.ladder=512,abc", "expected an integer"),
        ("trainer.async_save=later", "trainer.async_save=later': expected a boolean"),
    ],
)
def test_bad_overrides_name_the_field(override, needle):
    with pytest.raises(UserError, match=None) as err:
        apply_overrides(JobConfig(), [override])
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("monitor.tau=1.0", "monitor.tau"),
        ("monitor.tau=0", "monitor.tau"),
        ("rollout.n_samples=1", "rollout.n_samples"),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("grpo.dual_clip=0.5", "grpo.dual_clip"),
        ("grpo.tis_cap=0.5", "grpo.tis_cap"),
        ("distill.tis_cap=0.5", "distill.tis_cap"),
        ("distill.fixed_budget=1024", "distill.fixed_budget"),  # read only when budget_mode=fixed
        ("distill.budget_mode=fixed", None),
        ("distill.fixed_budget=-16", "distill.fixed_budget"),
        ("loop.steps=0", "loop.steps"),
        ("rollout.schedule=no-such-preset", "rollout.schedule"),
        ("rollout.schedule=/nonexistent/s.json", "rollout.schedule"),
        ("monitor.controller.step_tokens=100", "monitor.controller.step_tokens"),
        ("monitor.controller.min_budget=16", "monitor.controller.min_budget"),
        ("data.train_path=/nonexistent/train.jsonl", "data.train_path"),
        ("model.hf_dir=/nonexistent/model", "model.hf_dir"),
        ("tracking.copy_weights=-1", "tracking.copy_weights"),
        ("loop.eval_max_response_tokens=-1", "loop.eval_max_response_tokens"),
        ("reward.judge_timeout_s=0", "reward.judge_timeout_s"),
        ("data.eval={aime24: /nonexistent/aime24.jsonl}", "data.eval.aime24"),
        ("grpo.mini_batches=0", "grpo.mini_batches"),
        ("data.haystack=[600,500]", "data.haystack"),
        ("data.haystack=[2]", "data.haystack"),
        ("grpo.max_sampling_rounds=0", "grpo.max_sampling_rounds"),
        ("grpo.overlong_buffer=-1", "grpo.overlong_buffer"),
        ("grpo.overlong_penalty=-1", "grpo.overlong_penalty"),
    ],
)
def test_validation_names_the_field(override, field):
    cfg = apply_overrides(JobConfig(), [override])
    if field is None:  # accepted as it is
        validate(cfg)
        return
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert f"field '{field}'" in str(err.value)


def test_a_fixed_distill_budget_must_fit_the_schedules_pages():
    base = ["distill.budget_mode=fixed", "rollout.schedule=qwen3-8b-0.86"]
    validate(apply_overrides(JobConfig(), [*base, "distill.fixed_budget=2048"]))
    with pytest.raises(UserError, match="field 'distill.fixed_budget': 100 must be a multiple"):
        validate(apply_overrides(JobConfig(), [*base, "distill.fixed_budget=100"]))


def test_context_parallelism_is_accepted_but_not_with_distill():
    base = ["cluster.nodes=2", "cluster.rollout_nodes=1", "cluster.gpus_per_node=8", "trainer.tp=2"]
    validate(apply_overrides(JobConfig(), [*base, "trainer.cp=2"]))
    with pytest.raises(UserError, match="field 'trainer.cp': is 2, but DistillSparse"):
        validate(
            apply_overrides(
                JobConfig(), [*base, "trainer.cp=2", "distill.enabled=true", "rollout.schedule=qwen3-8b-0.86"]
            )
        )


def test_a_kl_penalty_is_refused_until_a_reference_policy_exists():
    cfg = apply_overrides(JobConfig(), ["grpo.kl_coef=0.001"])
    with pytest.raises(
        UserError, match=r"field 'grpo.kl_coef': is 0.001, but a KL penalty needs a frozen reference"
    ):
        validate(cfg)
    # TIS can be switched off in either phase.
    validate(apply_overrides(JobConfig(), ["grpo.tis_cap=null", "distill.tis_cap=2.0"]))


def test_the_overlong_buffer_must_leave_room_below_the_cutoff():
    cfg = apply_overrides(JobConfig(), ["grpo.overlong=penalty", "grpo.overlong_buffer=256"])
    with pytest.raises(UserError, match=r"field 'grpo.overlong_buffer': 256 must be below data.max_resp"):
        validate(cfg)
    validate(apply_overrides(JobConfig(), ["grpo.overlong=penalty", "grpo.overlong_buffer=64"]))


def test_all_problems_are_reported_at_once():
    cfg = apply_overrides(JobConfig(), ["monitor.tau=2", "loop.steps=0"])
    with pytest.raises(UserError) as err:
        validate(cfg)
    assert "2 problems" in str(err.value)
    assert "monitor.tau" in str(err.value) and "loop.steps" in str(err.value)


def test_math_needs_a_train_path(tmp_path):
    cfg = apply_overrides(JobConfig(), ["data.kind=math"])
    with pytest.raises(UserError, match="field 'data.train_path': is required"):
        validate(cfg)
    train = tmp_path / "train.jsonl"
    train.write_text("{}\n")
    validate(apply_overrides(cfg, [f"data.train_path={train}"]))


def test_named_eval_sets_and_eval_path_as_a_set_named_after_its_file(tmp_path):
    train, aime, math500 = (tmp_path / f"{n}.jsonl" for n in ("train", "aime24", "math500"))
    for f in (train, aime, math500):
        f.write_text("{}\n")
    base = apply_overrides(JobConfig(), ["data.kind=math", f"data.train_path={train}", "loop.eval_every=2"])
    with pytest.raises(UserError, match=r"field 'loop.eval_every'.*data.eval=\{name: path"):
        validate(base)  # evaluation without eval sets
    cfg = apply_overrides(base, [f"data.eval={{aime: {aime}}}", f"data.eval_path={math500}"])
    validate(cfg)
    assert cfg.data.eval_sets() == {"aime": str(aime), "math500": str(math500)}
    clash = apply_overrides(base, [f"data.eval={{math500: {aime}}}", f"data.eval_path={math500}"])
    with pytest.raises(UserError, match="field 'data.eval_path': its set name 'math500'"):
        validate(clash)
    with pytest.raises(UserError, match="field 'data.eval': set name 'train'"):
        validate(apply_overrides(base, [f"data.eval={{train: {aime}}}"]))
    with pytest.raises(UserError, match="field 'data.eval': the synthetic task evaluates on its own"):
        validate(apply_overrides(JobConfig(), [f"data.eval={{aime: {aime}}}"]))


def test_tp_checked_against_the_model_config(tmp_path):
    model = _model_dir(tmp_path, heads=16, kv_heads=8, layers=28)
    base = apply_overrides(JobConfig(), [f"model.hf_dir={model}"])
    validate(apply_overrides(base, ["trainer.tp=8", "trainer.pp=4", "rollout.engine_tp=4"]))
    with pytest.raises(
        UserError, match="field 'trainer.tp': 3 does not divide the model's 16 attention heads"
    ):
        validate(apply_overrides(base, ["trainer.tp=3"]))
    with pytest.raises(UserError, match="16 does not divide the model's 8 KV heads"):
        validate(apply_overrides(base, ["trainer.tp=16"]))
    with pytest.raises(UserError, match="field 'trainer.pp': 3 does not divide the model's 28 layers"):
        validate(apply_overrides(base, ["trainer.pp=3"]))
    with pytest.raises(UserError, match="field 'rollout.engine_tp'"):
        validate(apply_overrides(base, ["rollout.engine_tp=5"]))
    with pytest.raises(UserError, match="exceeds max_position_embeddings"):
        validate(apply_overrides(base, ["data.max_response_tokens=41000"]))


def test_parallelism_checked_against_the_cluster():
    base = apply_overrides(
        JobConfig(),
        ["cluster.executor=slurm", "cluster.nodes=3", "cluster.gpus_per_node=8", "cluster.rollout_nodes=1"],
    )
    validate(
        apply_overrides(base, ["trainer.tp=8", "trainer.pp=2", "rollout.engines=4", "rollout.engine_tp=2"])
    )
    with pytest.raises(
        UserError, match="field 'trainer.tp': tp\\*pp\\*cp = 24 must divide the trainer's 16 GPUs"
    ):
        validate(apply_overrides(base, ["trainer.tp=8", "trainer.pp=3"]))
    with pytest.raises(UserError, match="field 'rollout.engines'"):
        validate(apply_overrides(base, ["rollout.engines=8", "rollout.engine_tp=2"]))
    with pytest.raises(UserError, match="field 'cluster.rollout_nodes'"):
        validate(apply_overrides(base, ["cluster.rollout_nodes=3"]))


def test_controller_needs_a_sparse_schedule_with_matching_bins():
    cfg = apply_overrides(JobConfig(), ["monitor.controller.enabled=true"])
    with pytest.raises(UserError, match="field 'monitor.controller.enabled'"):
        validate(cfg)
    cfg = apply_overrides(cfg, ["rollout.schedule=qwen3-1.7b-0.86"])
    validate(cfg)
    with pytest.raises(UserError, match="field 'monitor.bin_width'"):
        validate(apply_overrides(cfg, ["monitor.bin_width=1000"]))


def test_yaml_and_json_recipes(tmp_path):
    data = {"name": "y", "rollout": {"n_samples": 4, "schedule": "qwen3-8b-0.86"}, "monitor": {"tau": 0.9}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    (tmp_path / "r.json").write_text(json.dumps(data))
    for name in ("r.yaml", "r.json"):
        cfg = load_config(tmp_path / name)
        assert cfg.name == "y" and cfg.rollout.n_samples == 4 and cfg.monitor.tau == 0.9
        assert cfg.rollout.temperature == 1.0  # missing fields keep defaults


def test_bad_recipe_files_name_the_file_and_field(tmp_path):
    bad_key = tmp_path / "bad_key.yaml"
    bad_key.write_text("rollout:\n  n_samples: 4\n  tempature: 0.7\n")
    with pytest.raises(UserError, match=r"bad_key.yaml: unknown field\(s\) 'rollout.tempature'"):
        load_recipe(bad_key)
    bad_type = tmp_path / "bad_type.json"
    bad_type.write_text(json.dumps({"loop": {"steps": "ten"}}))
    with pytest.raises(UserError, match="bad_type.json: field 'loop.steps': expected int, got 'ten'"):
        load_recipe(bad_type)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rollout: [\n")
    with pytest.raises(UserError, match="broken.yaml:.*not valid YAML"):
        load_recipe(broken)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"a": \n')
    with pytest.raises(UserError, match="broken.json:2: not valid JSON"):
        load_recipe(broken_json)
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    section = tmp_path / "section.yaml"
    section.write_text("rollout: 3\n")
    with pytest.raises(UserError, match="field 'rollout': expected a mapping"):
        load_recipe(section)
    with pytest.raises(UserError, match="must be a mapping"):
        from_dict([1, 2], source="x")


def test_python_recipe(tmp_path):
    good = tmp_path / "good.py"
    good.write_text(
        "from sparrow_megatron.config import JobConfig\n"
        "def recipe():\n"
        "    cfg = JobConfig(name='py')\n"
        "    cfg.rollout.schedule = 'qwen3-14b-0.86'\n"
        "    cfg.trainer.tp = 8\n"
        "    return cfg\n"
    )
    cfg = load_config(good, ["loop.steps=3"])
    assert (cfg.name, cfg.rollout.schedule, cfg.trainer.tp, cfg.loop.steps) == ("py", "qwen3-14b-0.86", 8, 3)

    wrong_type = tmp_path / "wrong_type.py"
    wrong_type.write_text(
        "from sparrow_megatron.config import JobConfig\n"
        "def recipe():\n    cfg = JobConfig()\n    cfg.trainer.tp = '2'\n    return cfg\n"
    )
    with pytest.raises(UserError, match="field 'trainer.tp': expected int"):
        load_recipe(wrong_type)
    no_fn = tmp_path / "no_fn.py"
    no_fn.write_text("x = 1\n")
    with pytest.raises(UserError, match="must define `recipe"):
        load_recipe(no_fn)
    raises = tmp_path / "raises.py"
    raises.write_text("import no_such_module_xyz\n")
    with pytest.raises(UserError, match="raises.py: the recipe failed to import"):
        load_recipe(raises)
    returns = tmp_path / "returns.py"
    returns.write_text("def recipe():\n    return 3\n")
    with pytest.raises(UserError, match="returned int"):
        load_recipe(returns)


def test_flat_dict_and_round_trip(tmp_path):
    cfg = apply_overrides(JobConfig(), ["data.columns={q: prompt}", "monitor.controller.ladder=[512, 1024]"])
    flat = cfg.to_flat_dict()
    assert flat["monitor.tau"] == 0.86
    assert flat["monitor.controller.enabled"] is False
    assert flat["monitor.controller.ladder"] == "[512, 1024]"
    assert flat["data.columns"] == '{"q": "prompt"}'
    assert flat["distill.target_modules"] == (
        '["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]'
    )
    assert all(isinstance(v, str | int | float | bool) for v in flat.values())
    assert all(len(k) <= 250 for k in flat)
    for suffix in (".yaml", ".json"):
        path = cfg.save(tmp_path / f"cfg{suffix}")
        assert load_recipe(path) == cfg


def test_mlflow_uri_defaults_to_sqlite_beside_the_run_dir(tmp_path):
    cfg = apply_overrides(JobConfig(), [f"loop.run_dir={tmp_path / 'run'}"])
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"  # one store for the runs in tmp_path
    cfg = apply_overrides(cfg, ["tracking.mlflow_uri=http://127.0.0.1:5000"])
    assert cfg.mlflow_uri == "http://127.0.0.1:5000"


def test_presets_validate():
    for name in PRESETS:
        validate(
            apply_overrides(
                JobConfig(),
                [
                    f"rollout.schedule={name}",
                    f"monitor.bin_width={PRESETS[name].bin_width}",
                    "monitor.controller.enabled=true",
                ],
            )
        )


@dataclasses.dataclass(frozen=True)
class _Inner:
    dense_layers: tuple[int, ...] = (0, 1)
    pair: tuple[int, str] = (1, "a")
    path: Path = Path("x")
    maybe: int | None = None


@dataclasses.dataclass(frozen=True)
class _Outer:
    inner: _Inner = dataclasses.field(default_factory=_Inner)


def test_overrides_work_on_other_components_dataclasses():
    # The lead composes each package's XConfig into the tree: tuples, paths, optionals and frozen ones.
    out = apply_overrides(
        _Outer(), ["inner.dense_layers=0,1,2", "inner.pair=(3, b)", "inner.path=/tmp/m", "inner.maybe=none"]
    )
    assert out.inner == _Inner(dense_layers=(0, 1, 2), pair=(3, "b"), path=Path("/tmp/m"), maybe=None)
    assert apply_overrides(_Outer(), ["inner.maybe=7"]).inner.maybe == 7
    assert apply_overrides(_Outer(), ["inner.dense_layers=[]"]).inner.dense_layers == ()
    with pytest.raises(UserError, match="expected 2 comma-separated values"):
        apply_overrides(_Outer(), ["inner.pair=1,b,c"])
    with pytest.raises(UserError, match="override 'inner.maybe=x': expected an integer"):
        apply_overrides(_Outer(), ["inner.maybe=x"])


def test_nemo_run_config_recipe(tmp_path):
    pytest.importorskip("nemo_run")
    recipe = tmp_path / "nemo.py"
    recipe.write_text(
        "import nemo_run as run\n"
        "from sparrow_megatron.config import JobConfig, LoopConfig\n"
        "def recipe():\n"
        "    return run.Config(JobConfig, name='nr', loop=run.Config(LoopConfig, steps=3))\n"
    )
    cfg = load_config(recipe, ["loop.seed=7"])
    assert (cfg.name, cfg.loop.steps, cfg.loop.seed) == ("nr", 3, 7)
    bad = tmp_path / "bad_nemo.py"
    bad.write_text(
        "import nemo_run as run\n"
        "from sparrow_megatron.config import LoopConfig\n"
        "def recipe():\n"
        "    return run.Config(LoopConfig, stepz=3)\n"
    )
    with pytest.raises(UserError, match="bad_nemo.py"):
        load_recipe(bad)
    built_wrong = tmp_path / "built_wrong.py"
    built_wrong.write_text(
        "import nemo_run as run\n"
        "from sparrow_megatron.config import LoopConfig\n"
        "def recipe():\n"
        "    return run.Config(LoopConfig, steps=3)\n"
    )
    with pytest.raises(UserError, match="returned LoopConfig, expected a JobConfig"):
        load_recipe(built_wrong)


def test_slurm_cluster_section_is_validated_with_field_names():
    base = apply_overrides(
        JobConfig(),
        ["cluster.executor=slurm", "cluster.nodes=4", "cluster.gpus_per_node=8", "cluster.rollout_nodes=2"],
    )
    validate(
        apply_overrides(base, ["rollout.engines=8", "rollout.engine_tp=2", "trainer.tp=4", "trainer.pp=2"])
    )
    with pytest.raises(UserError, match="field 'rollout.engines': 3 engines do not spread evenly"):
        validate(apply_overrides(base, ["rollout.engines=3"]))
    with pytest.raises(UserError, match="field 'trainer.tp': 3 does not divide cluster.gpus_per_node=8"):
        validate(apply_overrides(base, ["trainer.tp=3", "trainer.pp=1"]))
    with pytest.raises(UserError, match="field 'cluster.rollout_nodes': must be >= 1"):
        validate(apply_overrides(base, ["cluster.rollout_nodes=0"]))
    with pytest.raises(UserError, match="field 'cluster.time_limit'"):
        validate(apply_overrides(base, ["cluster.time_limit=4h"]))
    with pytest.raises(UserError, match="field 'cluster.container_mounts'"):
        validate(apply_overrides(base, ["cluster.container_mounts=/a:/a"]))
    with pytest.raises(UserError, match="field 'cluster.container_mounts\\[0\\]'"):
        validate(apply_overrides(base, ["cluster.container_image=img", "cluster.container_mounts=/a"]))
    # CPU Slurm nodes (the tiny recipe in CI): one trainer process, TP-1 engines.
    cpu = apply_overrides(base, ["cluster.gpus_per_node=0", "cluster.nodes=2", "cluster.rollout_nodes=1"])
    validate(cpu)
    with pytest.raises(UserError, match="CPU nodes"):
        validate(apply_overrides(cpu, ["trainer.tp=2"]))


def test_rollout_urls_are_base_urls_or_env():
    validate(apply_overrides(JobConfig(), ["rollout.urls=http://10.0.0.1:30010,http://10.0.0.1:30011"]))
    validate(apply_overrides(JobConfig(), ["rollout.urls=env"]))
    with pytest.raises(UserError, match="field 'rollout.urls\\[1\\]'"):
        validate(apply_overrides(JobConfig(), ["rollout.urls=http://a:1,10.0.0.1:30010"]))
