"""The run directory: the durable record of a job, and what `--resume` reads.

    run_dir/
      config.yaml            the resolved job config
      metrics.jsonl          one JSON line per completed step (appended, fsync'ed): the durable record
      checkpoints/step_N/    the state after step N; complete only once its COMPLETE marker exists
      schedules/step_N.json  the schedule in force from step N (written when it changes)
      plots/                 PNGs
      rollouts/step_N.jsonl  step N's samples, token by token (only with loop.dump_rollouts)
      mlflow_run.json        the MLflow run (the default store, mlflow.db, is beside the run directory)

Steps are numbered from 1. The loop appends step N's metrics, then (on checkpoint steps) writes
checkpoints/step_N. A checkpoint is written into `step_N.partial` and renamed only after the writer
calls `commit_checkpoint`, so a kill mid-write leaves no directory that looks complete. Resuming from
step_N drops the metrics lines of later steps (they are recomputed) so the record has each step once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparrow_megatron.errors import UserError

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
LOOP_STATE = "loop_state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    meta: dict[str, Any]


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues: after `step` (0 = from scratch), from `checkpoint` if any."""

    step: int
    checkpoint: Checkpoint | None
    loop_state: dict[str, Any] | None

    @property
    def next_step(self) -> int:
        return self.step + 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str | Iterable[str]) -> None:
    """Write `text` (or its chunks, streamed: a rollout dump can be a GB) to a temp file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.writelines((text,) if isinstance(text, str) else text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _json_safe(value: Any) -> Any:
    """JSON without NaN/Infinity tokens (not JSON, and other readers reject them): as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _from_json_safe(value: Any) -> Any:
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, dict):
        return {k: _from_json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json_safe(v) for v in value]
    return value


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def schedules(self) -> Path:
        return self.root / "schedules"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def rollouts(self) -> Path:
        return self.root / "rollouts"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    def create(self, config: Any | None = None) -> RunDir:
        """Make the layout; with a JobConfig, write config.yaml (the resolved config of this run)."""
        for d in (self.root, self.checkpoints, self.schedules, self.plots):
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"{d}: cannot create the run directory ({err.strerror})") from None
        if config is not None:
            config.save(self.config_path)
        return self

    def exists(self) -> bool:
        return self.metrics_path.exists() or (self.checkpoints.is_dir() and any(self.checkpoints.iterdir()))

    # -- metrics --------------------------------------------------------------------------------------

    def append_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one step's metrics as a JSON line and fsync: a kill never loses a completed step."""
        row = {"step": int(step), **_json_safe(dict(metrics))}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every well-formed row; a torn or corrupt line (a kill mid-write) is logged and skipped."""
        if not self.metrics_path.exists():
            return []
        rows = []
        with open(self.metrics_path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    log.warning(
                        "%s:%d: skipping a malformed metrics line (%s)", self.metrics_path, lineno, err.msg
                    )
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    log.warning(
                        "%s:%d: skipping a metrics line without an integer 'step'", self.metrics_path, lineno
                    )
                    continue
                rows.append(_from_json_safe(row))
        return rows

    def truncate_metrics(self, keep_through: int) -> int:
        """Keep only the rows of steps <= keep_through (resume re-runs the rest); returns rows dropped.

        The dropped rows are kept next to the file (metrics.jsonl.dropped-<step>), never deleted.
        """
        if not self.metrics_path.exists():
            return 0
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        keep, drop = [], []
        for line in lines:
            try:
                row = json.loads(line)
                step = row.get("step") if isinstance(row, dict) else None
            except json.JSONDecodeError:
                step = None
            (keep if isinstance(step, int) and step <= keep_through else drop).append(line)
        if drop:
            dropped = self.metrics_path.with_name(f"{self.metrics_path.name}.dropped-{keep_through}")
            with open(dropped, "a") as f:
                f.writelines(line if line.endswith("\n") else line + "\n" for line in drop)
            _write_atomic(self.metrics_path, keep)
            log.info(
                "%s: %d rows after step %d set aside in %s",
                self.metrics_path,
                len(drop),
                keep_through,
                dropped.name,
            )
        return len(drop)

    # -- checkpoints ----------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step}"

    def begin_checkpoint(self, step: int) -> Path:
        """An empty directory to write step N's checkpoint into (a leftover partial one is cleared)."""
        partial = self.checkpoints / f"step_{step}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def commit_checkpoint(self, step: int, meta: dict[str, Any] | None = None) -> Checkpoint:
        """Mark step N's partial checkpoint complete and move it into place (atomically)."""
        partial = self.checkpoints / f"step_{step}.partial"
        if not partial.is_dir():
            raise FileNotFoundError(f"{partial}: begin_checkpoint({step}) was not called")
        meta = {"step": int(step), **(meta or {})}
        _write_atomic(partial / COMPLETE_MARKER, json.dumps(_json_safe(meta), indent=2) + "\n")
        final = self.checkpoint_dir(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(self.checkpoints)
        return Checkpoint(step=step, path=final, meta=meta)

    def list_checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints, oldest first; incomplete ones are logged and ignored."""
        if not self.checkpoints.is_dir():
            return []
        found = []
        for d in self.checkpoints.iterdir():
            match = _STEP_DIR.match(d.name)
            if not match or not d.is_dir():
                continue
            marker = d / COMPLETE_MARKER
            try:
                meta = json.loads(marker.read_text())
            except FileNotFoundError:
                log.warning("%s: no %s marker, not a complete checkpoint; ignored", d, COMPLETE_MARKER)
                continue
            except (OSError, json.JSONDecodeError) as err:
                log.warning("%s: unreadable %s marker (%s); ignored", d, COMPLETE_MARKER, err)
                continue
            found.append(Checkpoint(step=int(match.group(1)), path=d, meta=_from_json_safe(meta)))
        return sorted(found, key=lambda c: c.step)

    def last_complete_checkpoint(self) -> Checkpoint | None:
        found = self.list_checkpoints()
        return found[-1] if found else None

    def prepare_resume(self) -> ResumePoint:
        """The last complete checkpoint and its loop state; metrics of later steps are set aside."""
        ckpt = self.last_complete_checkpoint()
        step = 0 if ckpt is None else ckpt.step
        state = None
        if ckpt is not None and (ckpt.path / LOOP_STATE).exists():
            state = self.read_loop_state(ckpt.path)
        dropped = self.truncate_metrics(keep_through=step)
        if ckpt is not None or dropped:  # a fresh run resumes nothing: the console says it starts
            log.info(
                "resuming %s after step %d (%s); %d later metrics rows set aside",
                self.root,
                step,
                "no checkpoint" if ckpt is None else ckpt.path.name,
                dropped,
            )
        return ResumePoint(step=step, checkpoint=ckpt, loop_state=state)

    @staticmethod
    def write_loop_state(checkpoint_dir: str | Path, state: dict[str, Any]) -> Path:
        """The loop's own state (monitor, controller, data cursor, RNG seeds) inside a checkpoint."""
        path = Path(checkpoint_dir) / LOOP_STATE
        _write_atomic(path, json.dumps(_json_safe(state)) + "\n")
        return path

    @staticmethod
    def read_loop_state(checkpoint_dir: str | Path) -> dict[str, Any]:
        path = Path(checkpoint_dir) / LOOP_STATE
        try:
            return _from_json_safe(json.loads(path.read_text()))
        except FileNotFoundError:
            raise UserError(f"{path}: the checkpoint has no loop state") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: corrupt loop state ({err.msg})") from None

    # -- rollout dumps (loop.dump_rollouts, loop/rollout_dump.py) ---------------------------------------

    def rollout_path(self, step: int) -> Path:
        return self.rollouts / f"step_{step}.jsonl"

    def write_rollouts(self, step: int, rows: Iterable[dict[str, Any]]) -> Path:
        """Step `step`'s sample records, one JSON line each (replacing a file a killed run left)."""
        self.rollouts.mkdir(parents=True, exist_ok=True)
        path = self.rollout_path(step)
        _write_atomic(path, (json.dumps(row) + "\n" for row in rows))
        return path

    def read_rollouts(self, step: int) -> list[dict[str, Any]]:
        """Step `step`'s sample records (written whole by `write_rollouts`: no torn lines)."""
        return [json.loads(line) for line in self.rollout_path(step).read_text().splitlines() if line]

    # -- schedules ------------------------------------------------------------------------------------

    def schedule_path(self, step: int) -> Path:
        return self.schedules / f"step_{step}.json"

    def save_schedule(self, schedule: Any, step: int) -> Path:
        """The schedule in force from `step` (a sparsity.schedule.Schedule)."""
        self.schedules.mkdir(parents=True, exist_ok=True)
        return schedule.save(self.schedule_path(step))

    def schedule_in_force(self, step: int) -> Path | None:
        """The file of the schedule in force at `step`: the latest saved at or before it."""
        best = None
        if self.schedules.is_dir():
            for p in self.schedules.glob("step_*.json"):
                match = _STEP_DIR.match(p.stem)
                if match and int(match.group(1)) <= step and (best is None or int(match.group(1)) > best[0]):
                    best = (int(match.group(1)), p)
        return None if best is None else best[1]
