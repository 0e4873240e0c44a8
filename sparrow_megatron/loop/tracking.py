"""MLflow tracking of a run: the flat config as params, metrics per step, files as artifacts.

Artifacts: schedule files, PNG plots, checkpoint directories. Uses `MlflowClient` with an explicit run
id rather than the fluent API, so no global "active run" leaks between runs, tests or threads.
Default store: `sqlite:///<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts` (next to
any sqlite file); any tracking URI (an `mlflow server` on 127.0.0.1, a team server) by config.
The run id is kept in `<run_dir>/mlflow_run.json` so `--resume` continues the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run.json"
# MLflow's limits (mlflow.utils.validation): batch sizes and the longest param value.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE = 6000


def default_uri(run_dir: str | Path) -> str:
    return f"sqlite:///{(Path(run_dir) / 'mlflow.db').resolve()}"


def saved_run_id(run_dir: str | Path) -> str | None:
    """The MLflow run id a previous start in this run directory created (None if none)."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        return json.loads(path.read_text())["run_id"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


class MlflowTracker:
    def __init__(self, uri: str | None, experiment: str, run_dir: str | Path, run_name: str | None = None):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = uri or default_uri(self.run_dir)
        self.experiment = experiment
        self.run_name = run_name or None
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as err:  # mlflow raises many types for a bad URI
            raise UserError(
                f"field 'tracking.mlflow_uri': cannot open MLflow store {self.uri!r} ({err})"
            ) from err
        self.run_id: str | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> MlflowTracker:
        """From a JobConfig (tracking.* and loop.run_dir)."""
        return cls(
            cfg.tracking.mlflow_uri or None,
            cfg.tracking.experiment,
            cfg.loop.run_dir,
            cfg.tracking.run_name or cfg.name,
        )

    # -- lifecycle ------------------------------------------------------------------------------------

    def _experiment_id(self) -> str:
        existing = self.client.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        # With a local sqlite store, keep artifacts next to the db file (MLflow's default is the cwd's
        # ./mlruns); a server decides for itself.
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

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
                self.client.get_run(run_id)
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
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name, tags=dict(tags or {}))
            run_id = run.info.run_id
            (self.run_dir / RUN_ID_FILE).write_text(json.dumps({"run_id": run_id, "uri": self.uri}) + "\n")
        self.run_id = run_id
        if tags and resume:
            self.set_tags(tags)
        if params:
            self.log_params(params)
        return run_id

    def finish(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MlflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.run_id is None:
            return
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
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

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a directory's contents under `artifact_path` (default: the directory's name)."""
        run_id = self._need_run()
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path=artifact_path or path.name)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)
        else:
            raise FileNotFoundError(f"{path}: no such artifact to log")

    def log_artifacts(self, paths: Iterable[str | Path], artifact_path: str | None = None) -> None:
        for p in paths:
            self.log_artifact(p, artifact_path)

    def log_schedule(self, schedule: Any, step: int) -> Path:
        """Write the schedule in force from `step` to run_dir/schedules/step_N.json and log it."""
        from sparrow_megatron.loop.rundir import RunDir

        path = RunDir(self.run_dir).save_schedule(schedule, step)
        self.log_artifact(path, "schedules")
        return path

    def ui_command(self) -> str:
        """How to look at this store in a browser."""
        if self.uri.startswith(("http://", "https://")):
            return f"open {self.uri}"
        return f"mlflow ui --backend-store-uri {self.uri} --host 127.0.0.1"
