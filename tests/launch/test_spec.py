from __future__ import annotations

import pytest

from sparrow_megatron.errors import UserError
from sparrow_megatron.launch.spec import LaunchSpec, TrainerGroupConfig, apply_overrides, load_spec, validate


def spec(**trainer) -> LaunchSpec:
    return LaunchSpec(name="s", rollout_cmd=["r"], trainer_cmd=["t"], trainer=TrainerGroupConfig(**trainer))


def test_overrides_parse_by_field_type_and_leave_the_original_alone():
    base = spec()
    new = apply_overrides(
        base,
        [
            "trainer.tp=4",
            "trainer.pp=2",
            "cluster.partition=none",
            "cluster.container_mounts=/a:/a,/b:/b",
            "cluster.container_image=img:1",
            'cluster.env={"NCCL_DEBUG": "INFO"}',
            "executor=local",
            "mlflow_uri=http://m:5000",
        ],
    )
    assert (new.trainer.tp, new.trainer.pp, new.trainer.dp) == (4, 2, 1)
    assert new.cluster.partition is None and new.cluster.container_mounts == ["/a:/a", "/b:/b"]
    assert new.cluster.env == {"NCCL_DEBUG": "INFO"} and new.executor == "local"
    assert base.trainer.tp == 1 and base.cluster.env == {}
    validate(new)


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.tpp=2", "unknown field 'trainer.tpp'"),
        ("trainer.tp=two", "expected an integer, got 'two'"),
        ("executor=k8s", "field 'executor': expected one of 'slurm', 'local'"),
        ("nodes", "expected key.sub=value"),
        ("rollout_cmd=x", "unknown field 'rollout_cmd'"),
        ("bogus.x=1", "unknown field 'bogus.x'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(spec(), [override])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["trainer.tp=3"], "trainer.tp"),  # 3 does not divide 8 GPUs per node
        (["trainer.pp=3"], "trainer.pp"),  # TP*PP=3 does not divide 8
        (["rollout.engine_tp=3"], "rollout.engine_tp"),
        (["trainer.nodes=0"], "trainer.nodes"),
        (["rollout.gpus_per_node=0"], "trainer.gpus_per_node"),
        (["cluster.time_limit=4h"], "cluster.time_limit"),
        (["cluster.time_limit=00:04:00"], "cluster.requeue_signal_s"),
        # 300 s + Slurm's 60 s early signal + the script's setup do not fit in 6 minutes
        (["cluster.time_limit=00:06:29"], "cluster.requeue_signal_s"),
        (["cluster.container_mounts=/a"], "cluster.container_mounts"),
        (["rollout.router_port=30011"], "rollout.router_port"),
        (["name=bad name"], "name"),
        (["cluster.account="], "cluster.account"),
    ],
)
def test_validation_rejects_with_the_field(overrides, field):
    with pytest.raises(UserError, match=f"field '{field}'"):
        validate(apply_overrides(spec(), overrides))


def test_time_limit_leaves_room_for_an_early_signal():
    assert validate(apply_overrides(spec(), ["cluster.time_limit=00:06:30"])).cluster.time_limit == "00:06:30"
    # No requeue signal: any limit does.
    no_signal = ["cluster.time_limit=00:01:00", "cluster.requeue_signal_s=0"]
    assert validate(apply_overrides(spec(), no_signal)).cluster.requeue_signal_s == 0


def test_callable_commands_see_the_overridden_spec():
    s = LaunchSpec(
        name="s", rollout_cmd=lambda sp: ["serve", f"--tp={sp.rollout.engine_tp}"], trainer_cmd=["t"]
    )
    assert apply_overrides(s, ["rollout.engine_tp=4"]).resolved_rollout_cmd() == ["serve", "--tp=4"]
    with pytest.raises(UserError, match="rollout_cmd"):
        validate(LaunchSpec(name="s", rollout_cmd=[], trainer_cmd=["t"]))


def test_load_spec_from_file(tmp_path):
    path = tmp_path / "myspec.py"
    path.write_text(
        "from sparrow_megatron.launch.spec import LaunchSpec\n"
        "def spec():\n    return LaunchSpec(name='f', rollout_cmd=['r'], trainer_cmd=['t'])\n"
    )
    assert load_spec(str(path)).name == "f"
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(UserError, match="neither SPEC nor spec"):
        load_spec(str(tmp_path / "empty.py"))
    with pytest.raises(UserError, match="not found"):
        load_spec(str(tmp_path / "missing.py"))
