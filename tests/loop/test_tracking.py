import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sparrow_megatron.config import JobConfig, apply_overrides
from sparrow_megatron.loop.tracking import MlflowTracker, default_uri, saved_run_id
from sparrow_megatron.sparsity.schedule import PRESETS


@pytest.fixture
def store(mlflow_store):
    return mlflow_store


@pytest.fixture
def cfg(tmp_path, store):
    return apply_overrides(
        JobConfig(name="track"),
        [
            f"loop.run_dir={tmp_path / 'run'}",
            "tracking.experiment=exp",
            f"tracking.mlflow_uri=sqlite:///{store}",
        ],
    )


def test_default_store_is_sqlite_in_the_run_dir(tmp_path):
    cfg = apply_overrides(JobConfig(), [f"loop.run_dir={tmp_path / 'run'}"])
    # (Not opened here: creating a sqlite store runs MLflow's migrations, seconds on 2 cores.)
    assert default_uri(cfg.loop.run_dir) == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}" == cfg.mlflow_uri


def test_params_metrics_artifacts_round_trip(cfg, tmp_path, store):
    tracker = MlflowTracker.from_config(cfg)
    with tracker:
        run_id = tracker.start(cfg.to_flat_dict(), tags={"recipe": "tiny"})
        for step in range(1, 4):
            tracker.log_metrics(
                step,
                {
                    "reward/mean": step / 10,
                    "tail/p5/bin_02000": np.float32(0.8 + step / 100),
                    "tokens": np.int64(100 * step),
                    "loss": torch.tensor(1.5 / step),
                    "kl": float("nan"),
                    "skipped": None,
                    "label": "text",
                    "vector": np.ones(3),
                },
            )
        tracker.log_schedule(PRESETS["qwen3-4b-0.86"], step=1)
        png = tmp_path / "plot.png"
        png.write_bytes(b"\x89PNG fake")
        tracker.log_artifact(png, "plots")
        ckpt = tmp_path / "step_3"
        (ckpt / "model").mkdir(parents=True)
        (ckpt / "model" / "w.bin").write_bytes(b"w")
        tracker.log_artifact(ckpt, "checkpoints/step_3")
        with pytest.raises(FileNotFoundError):
            tracker.log_artifact(tmp_path / "missing.png")

    client = MlflowClient(cfg.mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "track"
    assert run.data.tags["recipe"] == "tiny"
    flat = cfg.to_flat_dict()
    assert run.data.params == {k: str(v) for k, v in flat.items()}
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
    p5 = sorted(client.get_metric_history(run_id, "tail/p5/bin_02000"), key=lambda m: m.step)
    assert [round(m.value, 5) for m in p5] == [0.81, 0.82, 0.83]
    assert [
        m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    ] == pytest.approx([1.5, 0.75, 0.5])
    assert math.isnan(client.get_metric_history(run_id, "kl")[0].value)
    assert set(run.data.metrics) == {"reward/mean", "tail/p5/bin_02000", "tokens", "loss", "kl"}
    names = {a.path for a in client.list_artifacts(run_id)}
    assert names == {"schedules", "plots", "checkpoints"}
    assert [a.path for a in client.list_artifacts(run_id, "schedules")] == ["schedules/step_1.json"]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoints/step_3/model")] == [
        "checkpoints/step_3/model/w.bin"
    ]
    # Artifacts live next to the sqlite store, not in the cwd's ./mlruns.
    assert (store.parent / "mlartifacts").is_dir()
    assert (tmp_path / "run" / "schedules" / "step_1.json").is_file()


def test_resume_continues_the_same_run(cfg):
    with MlflowTracker.from_config(cfg) as tracker:
        run_id = tracker.start(cfg.to_flat_dict())
        tracker.log_metrics(1, {"reward/mean": 0.1})
    assert saved_run_id(cfg.loop.run_dir) == run_id

    changed = apply_overrides(cfg, ["loop.steps=50"])
    with MlflowTracker.from_config(changed) as tracker:
        assert tracker.start(changed.to_flat_dict(), resume=True) == run_id
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
        tracker.log_metrics(2, {"reward/mean": 0.2})
    client = MlflowClient(cfg.mlflow_uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "reward/mean")) == [1, 2]
    assert client.get_run(run_id).data.params["loop.steps"] == str(cfg.loop.steps)  # first value kept
    assert client.get_run(run_id).info.status == "FINISHED"
    # Without resume a new run starts.
    with MlflowTracker.from_config(cfg) as tracker:
        assert tracker.start() != run_id


def test_failure_marks_the_run_failed(cfg):
    tracker = MlflowTracker.from_config(cfg)
    with pytest.raises(ValueError), tracker:
        run_id = tracker.start()
        raise ValueError("boom")
    assert MlflowClient(cfg.mlflow_uri).get_run(run_id).info.status == "FAILED"
    assert "mlflow ui --backend-store-uri sqlite:///" in tracker.ui_command()


def test_many_metrics_are_batched(cfg):
    with MlflowTracker.from_config(cfg) as tracker:
        run_id = tracker.start()
        tracker.log_metrics(0, {f"tail/p5/bin_{i * 2000:05d}": 0.5 for i in range(1200)})
    assert len(MlflowClient(cfg.mlflow_uri).get_run(run_id).data.metrics) == 1200
