"""MLflow tracking of a run: one store for a project's runs, a named and tagged run per run directory.

Default store: `sqlite:///<run_dir>/../mlflow.db`, shared by every run directory beside it, one
experiment per recipe (the job name), the run named after its run directory. Artifacts go to
`mlartifacts/` beside the db and are recorded as `mlflow-artifacts:/<experiment>/<run>/artifacts`,
a location relative to the server's artifact root rather than an absolute path: `mlflow ui` (or
`sparrow ui`) started on the store resolves them wherever the store now lives. Any tracking URI (an
`mlflow server`, a team server) by config; artifacts then go wherever that server puts them.

Uses `MlflowClient` with an explicit run id rather than the fluent API, so no global "active run"
leaks between runs, tests or threads. The run id is kept in `<run_dir>/mlflow_run.json` so
`--resume` continues the same MLflow run.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import numbers
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"  # also `mlflow server`'s default --artifacts-destination
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless the experiment says otherwise.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow's limits (mlflow.utils.validation): batch sizes and the longest param value.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000
SYSTEM_METRICS_INTERVAL_S = 10.0


def default_store(run_dir: str | Path) -> Path:
    """The project's store: mlflow.db in the directory that holds the run directories."""
    return Path(run_dir).resolve().parent / STORE_FILE


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{default_store(run_dir)}"


def local_store(uri: str) -> Path | None:
    """The sqlite file of a local store URI (None for a server or any other backend)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def local_artifacts(store: str | Path, artifact_uri: str) -> Path | None:
    """The folder of a run's artifacts in a local store (None if its location is not the store's)."""
    if not artifact_uri.startswith("mlflow-artifacts:"):
        return None
    return Path(store).parent / ARTIFACTS_DIR / artifact_uri[len("mlflow-artifacts:") :].lstrip("/")


def run_page_url(base: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the UI, in the model-training view (MLflow 3 defaults to its GenAI view)."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def saved_run(run_dir: str | Path) -> dict[str, str] | None:
    """What a previous start in this run directory recorded: run_id, uri, experiment_id (or None)."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_id"), str) else None


def saved_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a previous start in this run directory created (None if none)."""
    record = saved_run(run_dir)
    return None if record is None else record["run_id"]


def file_digest(path: str | Path) -> tuple[str, int]:
    """sha256 (hex) and size in bytes of a file, or of a directory's files (names and contents)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = hashlib.sha256()
    size = 0
    for f in files:
        with open(f, "rb") as fh:
            digest = hashlib.file_digest(fh, "sha256").hexdigest()
        if path.is_dir():
            total.update(f"{f.relative_to(path).as_posix()}\0{digest}\n".encode())
        size += f.stat().st_size
    return (total.hexdigest() if path.is_dir() else digest), size


def git_commit(path: str | Path) -> str | None:
    """The commit checked out where the package lives (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def context_tags(recipe: str, source: str | None = None) -> dict[str, str]:
    """The tags MLflow's UI shows as the run's source, user and git commit, plus the recipe."""
    # The UI shows the source name's last path component: the command, not its (path) arguments,
    # which go to sparrow.command.
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": source or " ".join(["sparrow", *sys.argv[1:2]]),
        "mlflow.user": getpass.getuser(),
        "sparrow.recipe": recipe,
        "sparrow.command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:4000],
    }
    commit = git_commit(Path(__file__).resolve().parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


@dataclass(frozen=True)
class DatasetRef:
    """A dataset the run reads, as logged to MLflow's inputs: where, which content, how many rows."""

    name: str
    context: str  # "train", or "eval/<set>" for each evaluation set
    source: str  # a path, or a description of a generated task
    digest: str
    rows: int

    @classmethod
    def from_file(cls, path: str | Path, context: str, rows: int) -> DatasetRef:
        digest, _ = file_digest(path)
        return cls(Path(path).name, context, str(Path(path).resolve()), digest, rows)


def dataset_refs(cfg: Any, task: Any) -> list[DatasetRef]:
    """The train and eval data of a job (a JobConfig and its loop task), for MLflow's inputs."""
    if cfg.data.kind != "synthetic":
        splits = getattr(task, "splits", {})
        # Context "train", or "eval/<set>" for each evaluation set.
        files = [("train", cfg.data.train_path)]
        files += [(f"eval/{name}", path) for name, path in cfg.data.eval_sets().items()]
        return [
            DatasetRef.from_file(path, context, len(splits.get(context.removeprefix("eval/"), ())))
            for context, path in files
            if path
        ]
    # A generated task has no file: its digest is that of the prompts the run reads.
    loop = cfg.loop
    sizes = {"train": ("train", cfg.data.train_size or loop.steps * loop.prompts_per_step)}
    if loop.eval_every:
        for name in task.eval_sets():
            sizes[f"eval/{name}"] = (name, loop.eval_prompts or loop.prompts_per_step)
    refs = []
    for context, (split, rows) in sizes.items():
        digest = hashlib.sha256()
        for prompt in task.prompts(split, 0, rows):
            digest.update(prompt.text.encode() + b"\0")
        source = f"synthetic {cfg.data.kind} task, seed {loop.seed}"
        refs.append(DatasetRef(f"{cfg.data.kind}-recall", context, source, digest.hexdigest(), rows))
    return refs


class MlflowTracker:
    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_dir: str | Path,
        run_name: str | None = None,
        system_metrics: bool = True,
    ):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or default_uri(self.run_dir)
        self.experiment = experiment
        self.run_name = run_name or self.run_dir.resolve().name
        self.system_metrics = system_metrics
        self.store = local_store(self.uri)
        try:
            if self.store is not None:
                self.store.parent.mkdir(parents=True, exist_ok=True)
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as err:  # mlflow raises many types for a bad URI
            raise UserError(
                f"field 'tracking.mlflow_uri': cannot open MLflow store {self.uri!r} ({err})"
            ) from err
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._monitor = None
        self._repo = None

    @classmethod
    def from_config(cls, cfg: Any) -> MlflowTracker:
        """From a JobConfig: tracking.* (empty fields: the default store, the job name, the run dir's name)."""
        return cls(
            cfg.tracking.mlflow_uri or None,
            cfg.tracking.experiment or cfg.name,
            cfg.loop.run_dir,
            cfg.tracking.run_name or None,
        )

    # -- lifecycle ------------------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        existing = self.client.get_experiment_by_name(self.experiment)
        if existing is not None:
            experiment_id = existing.experiment_id
        else:
            # A local store records artifact locations relative to the artifact root its UI serves
            # (mlartifacts/ beside the db), never absolute paths: the store can move. A server
            # decides for itself.
            location = None
            if self.store is not None:
                slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.experiment).strip("-") or "experiment"
                location = f"mlflow-artifacts:/{slug}"
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=location)
        for key, value in EXPERIMENT_KIND.items():
            self.client.set_experiment_tag(experiment_id, key, value)
        return experiment_id

    def start(
        self,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        resume: bool = False,
    ) -> str:
        """Create the run (or, with resume, reopen the one this run directory recorded); log params."""
        run_id = saved_run_id(self.run_dir) if resume else None
        if run_id is not None:
            try:
                self.experiment_id = self.client.get_run(run_id).info.experiment_id
            except Exception:
                log.warning(
                    "MLflow run %s recorded in %s is not in %s; starting a new run",
                    run_id,
                    self.run_dir / RUN_ID_FILE,
                    self.uri,
                )
                run_id = None
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            log.info("resuming MLflow run %s", run_id)
        else:
            self.experiment_id = self._experiment_id()
            run = self.client.create_run(self.experiment_id, run_name=self.run_name, tags=dict(tags or {}))
            run_id = run.info.run_id
            record = {"run_id": run_id, "uri": self.uri, "experiment_id": self.experiment_id}
            (self.run_dir / RUN_ID_FILE).write_text(json.dumps(record) + "\n")
        self.run_id = run_id
        if tags and resume:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        if self.system_metrics:
            self._start_system_metrics(resume)
        return run_id

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU, memory, disk, network (psutil) and, where NVML answers, GPU use under system/*."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id,
                sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                resume_logging=resume,
                tracking_uri=self.uri,
            )
            self._monitor.start()
        except Exception as err:  # psutil missing, an odd platform: the run goes on without them
            log.warning("MLflow system metrics are off (%s)", err)
            self._monitor = None

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):  # SystemExit: stopped to requeue
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def _need_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("MlflowTracker.start() was not called")
        return self.run_id

    # -- logging --------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Params as strings; on a resume, keys already logged keep their value (MLflow forbids changes)."""
        from mlflow.entities import Param

        run_id = self._need_run()
        existing = self.client.get_run(run_id).data.params
        batch = []
        for key, value in params.items():
            text = str(value)
            if len(text) > _MAX_PARAM_VALUE:
                log.warning(
                    "param %s is %d characters; truncated to MLflow's %d", key, len(text), _MAX_PARAM_VALUE
                )
                text = text[:_MAX_PARAM_VALUE]
            if key in existing:
                if existing[key] != text:
                    log.warning(
                        "param %s changed on resume (%r -> %r); MLflow keeps the first value",
                        key,
                        existing[key],
                        text,
                    )
                continue
            batch.append(Param(key, text))
        for i in range(0, len(batch), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=batch[i : i + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Numeric metrics of one step (None and non-numbers are skipped; NaN is kept, MLflow stores it)."""
        from mlflow.entities import Metric

        run_id = self._need_run()
        now = int(time.time() * 1000)
        batch = []
        for key, value in metrics.items():
            if not isinstance(value, numbers.Real):
                try:
                    value = value.item()  # a one-element tensor or array
                except (AttributeError, ValueError, RuntimeError):
                    continue
                if not isinstance(value, numbers.Real):
                    continue
            value = float(value)
            if math.isinf(value):  # MLflow rejects infinities in some stores; clamp like its fluent API would
                value = math.copysign(1.7976931348623157e308, value)
            batch.append(Metric(key, value, now, int(step)))
        for i in range(0, len(batch), _MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=batch[i : i + _MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        run_id = self._need_run()
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def set_description(self, text: str) -> None:
        """The run's description on its page (MLflow's note): the end-of-run summary."""
        self.set_tags({"mlflow.note.content": text})

    def log_datasets(self, datasets: Iterable[DatasetRef]) -> None:
        """The run's train/eval data as MLflow inputs (the Datasets column and the run page)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = [
            DatasetInput(
                Dataset(
                    name=d.name,
                    digest=d.digest[:32],  # MLflow's column holds 36 characters
                    source_type="local" if Path(d.source).is_absolute() else "code",
                    source=json.dumps({"path" if Path(d.source).is_absolute() else "task": d.source}),
                    profile=json.dumps({"num_rows": d.rows, "sha256": d.digest}),
                ),
                tags=[InputTag("mlflow.data.context", d.context)],
            )
            for d in datasets
        ]
        if inputs:
            self.client.log_inputs(self._need_run(), datasets=inputs)

    def _artifact_repo(self):
        """Where this run's artifacts are written: for a local store, mlartifacts/ beside it (the
        recorded mlflow-artifacts: location is what a UI server resolves; a plain client cannot)."""
        if self._repo is None:
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            uri = self.client.get_run(self._need_run()).info.artifact_uri
            folder = local_artifacts(self.store, uri) if self.store is not None else None
            if folder is not None:
                uri = folder.as_uri()
            self._repo = get_artifact_repository(uri, tracking_uri=self.uri)
        return self._repo

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents under `artifact_path` (default: the directory's name)."""
        self._need_run()
        path = Path(path)
        if path.is_dir():
            self._artifact_repo().log_artifacts(str(path), artifact_path or path.name)
        elif path.is_file():
            self._artifact_repo().log_artifact(str(path), artifact_path)
        else:
            raise FileNotFoundError(f"{path}: no such artifact to log")

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.log_artifact(p, artifact_path)

    def list_artifacts(self, path: str | None = None) -> list[str]:
        return [f.path for f in self._artifact_repo().list_artifacts(path)]

    def log_weights(self, path: str | Path, copy_below_mb: int, artifact_path: str = "final_hf") -> bool:
        """Reference the final weights by path and sha256 (tags); copy them into the artifact store
        only when they are smaller than `copy_below_mb` MB (0: never). Returns whether they were copied."""
        path = Path(path)
        digest, size = file_digest(path)
        copied = copy_below_mb > 0 and size < copy_below_mb * 2**20
        self.set_tags(
            {
                f"sparrow.{artifact_path}.path": str(path.resolve()),
                f"sparrow.{artifact_path}.sha256": digest,
                f"sparrow.{artifact_path}.bytes": size,
                f"sparrow.{artifact_path}.copied": copied,
            }
        )
        if copied:
            self.log_artifact(path, artifact_path)
        return copied

    def log_schedule(self, schedule: Any, step: int) -> Path:
        """Write the schedule in force from `step` to run_dir/schedules/step_N.json and log it."""
        from sparrow_megatron.loop.rundir import RunDir

        path = RunDir(self.run_dir).save_schedule(schedule, step)
        self.log_artifact(path, "schedules")
        return path

    def ui_command(self) -> str:
        """How to look at this run in a browser."""
        if self.uri.startswith(("http://", "https://")) and self.experiment_id and self.run_id:
            return run_page_url(self.uri, self.experiment_id, self.run_id)
        return f"sparrow ui {self.run_dir}"
