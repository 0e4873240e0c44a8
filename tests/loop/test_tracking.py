import contextlib
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from sparrow_megatron.config import JobConfig, apply_overrides
from sparrow_megatron.loop import tracking
from sparrow_megatron.loop.default import tiny_cpu
from sparrow_megatron.loop.recorder import StepRecorder
from sparrow_megatron.loop.rundir import RunDir
from sparrow_megatron.loop.tracking import (
    MlflowTracker,
    context_tags,
    dataset_refs,
    default_uri,
    git_commit,
    saved_run_id,
)
from sparrow_megatron.rollout.server import free_port
from sparrow_megatron.sparsity.schedule import PRESETS

REPO = Path(__file__).resolve().parents[2]
URL = re.compile(
    r"^run: (http://127\.0\.0\.1:\d+)/#/experiments/(\w+)/runs/(\w+)\?workflowType=machine_learning$"
)


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


def _tracker(cfg, **kw) -> MlflowTracker:
    t = MlflowTracker.from_config(cfg)
    t.system_metrics = kw.get("system_metrics", False)  # a sampler thread per test is noise on 2 cores
    return t


@contextlib.contextmanager
def _process(cmd: list[str], cwd: Path | None = None):
    """A server process in its own group; the whole group is stopped afterwards (workers included)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_health(base: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"{base} not healthy within {timeout} s")


def test_default_store_is_beside_the_run_dirs(tmp_path):
    cfg = apply_overrides(JobConfig(), [f"loop.run_dir={tmp_path / 'runs' / 'a'}"])
    # (Not opened here: creating a sqlite store runs MLflow's migrations, seconds on 2 cores.)
    want = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert default_uri(cfg.loop.run_dir) == want == cfg.mlflow_uri
    assert default_uri(tmp_path / "runs" / "b") == want  # one store for the project's runs


def test_params_metrics_artifacts_round_trip(cfg, tmp_path, store):
    tracker = _tracker(cfg)
    with tracker:
        run_id = tracker.start(cfg.to_flat_dict(), tags={"recipe": "tiny"})
        for step in range(1, 4):
            tracker.log_metrics(
                step,
                {
                    "reward/mean": step / 10,
                    "tail_bin_02000/p5": np.float32(0.8 + step / 100),
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
    assert run.info.run_name == "run"  # the run directory's name
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"  # MLflow 3's UI then opens the experiment on its training runs
    )
    assert run.data.tags["recipe"] == "tiny"
    flat = cfg.to_flat_dict()
    assert run.data.params == {k: str(v) for k, v in flat.items()}
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (1, 0.1),
        (2, 0.2),
        (3, 0.3),
    ]
    p5 = sorted(client.get_metric_history(run_id, "tail_bin_02000/p5"), key=lambda m: m.step)
    assert [round(m.value, 5) for m in p5] == [0.81, 0.82, 0.83]
    assert [
        m.value for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    ] == pytest.approx([1.5, 0.75, 0.5])
    assert math.isnan(client.get_metric_history(run_id, "kl")[0].value)
    assert set(run.data.metrics) == {"reward/mean", "tail_bin_02000/p5", "tokens", "loss", "kl"}
    # The recorded artifact location is relative to the store's artifact root, not a path.
    assert run.info.artifact_uri == f"mlflow-artifacts:/exp/{run_id}/artifacts"
    assert set(tracker.list_artifacts()) == {"schedules", "plots", "checkpoints"}
    assert tracker.list_artifacts("schedules") == ["schedules/step_1.json"]
    assert tracker.list_artifacts("checkpoints/step_3/model") == ["checkpoints/step_3/model/w.bin"]
    root = store.parent / "mlartifacts" / "exp" / run_id / "artifacts"
    assert (root / "checkpoints" / "step_3" / "model" / "w.bin").read_bytes() == b"w"
    assert (tmp_path / "run" / "schedules" / "step_1.json").is_file()


def test_context_datasets_description_weights_and_system_metrics(cfg, tmp_path, monkeypatch):
    from sparrow_megatron.data.datasets import load_tokenizer
    from sparrow_megatron.data.recall import TINY_RECALL_DIR
    from sparrow_megatron.loop.tasks import make_task

    monkeypatch.setattr(tracking, "SYSTEM_METRICS_INTERVAL_S", 0.5)
    job = apply_overrides(
        tiny_cpu(), [f"loop.run_dir={tmp_path / 'run'}", f"tracking.mlflow_uri={cfg.mlflow_uri}"]
    )
    task = make_task(job, load_tokenizer(TINY_RECALL_DIR))
    refs = dataset_refs(job, task)
    assert [(r.context, r.rows) for r in refs] == [("train", 16), ("eval/recall", 8)]
    assert refs == dataset_refs(job, task)  # the digest is the prompts' content: stable
    weights = tmp_path / "final_hf"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(os.urandom(2 * 2**20))
    tracker = _tracker(job, system_metrics=True)
    with tracker:
        run_id = tracker.start(tags=context_tags(job.name, source="sparrow train"))
        tracker.log_datasets(refs)
        client = MlflowClient(job.mlflow_uri)
        deadline = time.monotonic() + 60
        while "system/cpu_utilization_percentage" not in client.get_run(run_id).data.metrics:
            assert time.monotonic() < deadline, "no system metrics logged"
            time.sleep(0.5)
        assert not tracker.log_weights(weights, copy_below_mb=2)  # 2 MB is not below 2 MB
        tracker.set_description("| quantity | value |\n|---|---|\n| reward | 0.1 -> 0.5 |\n")
    run = client.get_run(run_id)
    tags = run.data.tags
    assert (
        tags["mlflow.source.git.commit"] == git_commit(REPO) and len(tags["mlflow.source.git.commit"]) == 40
    )
    assert tags["mlflow.source.name"] == "sparrow train" and tags["mlflow.user"]
    assert tags["sparrow.recipe"] == "tiny-cpu" and run.info.experiment_id == (
        client.get_experiment_by_name("tiny-cpu").experiment_id  # one experiment per recipe
    )
    assert tags["mlflow.note.content"].startswith("| quantity | value |")
    assert tags["sparrow.final_hf.path"] == str(weights) and tags["sparrow.final_hf.copied"] == "False"
    assert tags["sparrow.final_hf.sha256"] == tracking.file_digest(weights)[0]
    assert int(tags["sparrow.final_hf.bytes"]) == 2 * 2**20
    assert "final_hf" not in tracker.list_artifacts()
    inputs = {(d.tags[0].value, d.dataset.digest, d.dataset.profile) for d in run.inputs.dataset_inputs}
    assert inputs == {
        (r.context, r.digest[:32], f'{{"num_rows": {r.rows}, "sha256": "{r.digest}"}}') for r in refs
    }
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    # Below the threshold the weights are copied too.
    with _tracker(job) as small:
        small.start()
        assert small.log_weights(weights, copy_below_mb=3)
        assert small.list_artifacts("final_hf") == ["final_hf/model.safetensors"]


def test_two_runs_of_the_embedded_default_share_a_store_that_can_move(tmp_path):
    """Two short runs of the embedded default in the project's store, compared; then the whole
    project folder moves and `sparrow ui` on a run directory serves the run and its artifacts."""
    runs = tmp_path / "project" / "runs"
    ids = {}
    for name, reward in (("tiny-a", 0.25), ("tiny-b", 0.5)):
        job = apply_overrides(tiny_cpu(), [f"loop.run_dir={runs / name}"])
        run = RunDir(job.run_dir).create(job)
        with _tracker(job) as tracker:
            ids[name] = tracker.start(job.to_flat_dict(), tags=context_tags(job.name))
            recorder = StepRecorder(run, tracker)
            recorder.log_record()
            for step in (1, 2):
                recorder.record(step, {"reward/mean": reward * step, "tail_bin_01024/count": 40.0},
                                PRESETS["tiny-recall-256"])  # fmt: skip
            recorder.plots()
    assert (runs / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny-cpu")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"tiny-a", "tiny-b"}
    a, b = found["tiny-a"], found["tiny-b"]
    for r in (a, b):
        assert r.data.tags["sparrow.recipe"] == "tiny-cpu"
        assert r.data.tags["mlflow.source.git.commit"] == git_commit(REPO)
    assert {k for k in a.data.params if a.data.params[k] != b.data.params[k]} == {"loop.run_dir"}
    assert set(a.data.metrics) == set(b.data.metrics)  # comparable: the same charts side by side
    assert (a.data.metrics["reward/mean"], b.data.metrics["reward/mean"]) == (0.5, 1.0)
    assert a.data.metrics["tail_bin_01024/budget"] == 256.0

    moved = tmp_path / "elsewhere" / "runs"
    moved.parent.mkdir()
    shutil.move(runs, moved)
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sparrow_megatron.cli.main",
        "ui",
        str(moved / "tiny-a"),
        "--port",
        str(port),
    ]
    with _process(cmd, cwd=tmp_path) as proc:
        lines = []
        while not (lines and lines[-1].startswith("run: ")):
            line = proc.stdout.readline()
            assert line, "sparrow ui ended early:\n" + "".join(lines)
            lines.append(line.strip())
        match = URL.match(lines[-1])
        assert match, lines[-1]
        base, experiment_id, run_id = match.groups()
        assert (base, experiment_id, run_id) == (
            f"http://127.0.0.1:{port}",
            experiment.experiment_id,
            ids["tiny-a"],
        )
        assert lines[-2] == f"MLflow UI on {moved / 'mlflow.db'}: {base}"
        served = MlflowClient(base)
        names = {f.path for f in served.list_artifacts(run_id)}
        assert {"config.yaml", "metrics.jsonl", "plots"} <= names
        got = served.download_artifacts(run_id, "config.yaml", str(tmp_path / "dl"))
        assert Path(got).read_text() == (moved / "tiny-a" / "config.yaml").read_text()
        page = httpx.get(f"{base}/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()


def test_resume_continues_the_same_run(cfg):
    with _tracker(cfg) as tracker:
        run_id = tracker.start(cfg.to_flat_dict())
        tracker.log_metrics(1, {"reward/mean": 0.1})
    assert saved_run_id(cfg.loop.run_dir) == run_id

    changed = apply_overrides(cfg, ["loop.steps=50"])
    with _tracker(changed) as tracker:
        assert tracker.start(changed.to_flat_dict(), resume=True) == run_id
        assert tracker.client.get_run(run_id).info.status == "RUNNING"
        tracker.log_metrics(2, {"reward/mean": 0.2})
    client = MlflowClient(cfg.mlflow_uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "reward/mean")) == [1, 2]
    assert client.get_run(run_id).data.params["loop.steps"] == str(cfg.loop.steps)  # first value kept
    assert client.get_run(run_id).info.status == "FINISHED"
    # Without resume a new run starts.
    with _tracker(cfg) as tracker:
        assert tracker.start() != run_id


def test_an_mlflow_server_works_the_same(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "server_artifacts")]  # fmt: skip
    with _process(cmd) as proc:
        _wait_health(base, proc)
        job = apply_overrides(
            tiny_cpu(), [f"loop.run_dir={tmp_path / 'runs' / 'r1'}", f"tracking.mlflow_uri={base}"]
        )
        with _tracker(job) as tracker:
            run_id = tracker.start(job.to_flat_dict(), tags=context_tags(job.name))
            tracker.log_metrics(1, {"reward/mean": 0.25})
            tracker.log_schedule(PRESETS["tiny-recall-256"], 1)
            assert tracker.ui_command() == f"{base}/#/experiments/{tracker.experiment_id}/runs/{run_id}" + (
                "?workflowType=machine_learning"
            )
        with _tracker(job) as tracker:  # --resume
            assert tracker.start(job.to_flat_dict(), resume=True) == run_id
            tracker.log_metrics(2, {"reward/mean": 0.5})
        client = MlflowClient(base)
        run = client.get_run(run_id)
        assert run.info.run_name == "r1" and run.data.tags["sparrow.recipe"] == "tiny-cpu"
        assert [m.step for m in client.get_metric_history(run_id, "reward/mean")] == [1, 2]
        assert [f.path for f in client.list_artifacts(run_id, "schedules")] == ["schedules/step_1.json"]
        assert (tmp_path / "server_artifacts").is_dir()  # the server's store, not the run directory's
        assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_failure_marks_the_run_failed(cfg):
    tracker = _tracker(cfg)
    with pytest.raises(ValueError), tracker:
        run_id = tracker.start()
        raise ValueError("boom")
    assert MlflowClient(cfg.mlflow_uri).get_run(run_id).info.status == "FAILED"
    assert tracker.ui_command() == f"sparrow ui {cfg.loop.run_dir}"


def test_many_metrics_are_batched(cfg):
    with _tracker(cfg) as tracker:
        run_id = tracker.start()
        tracker.log_metrics(0, {f"tail_bin_{i * 2000:05d}/p5": 0.5 for i in range(1200)})
    assert len(MlflowClient(cfg.mlflow_uri).get_run(run_id).data.metrics) == 1200
