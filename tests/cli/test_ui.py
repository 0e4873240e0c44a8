"""`sparrow ui`: what a target resolves to; a run tracked on a server gets its link, nothing started.
(Serving a moved store is tested with the tracker: tests/loop/test_tracking.py.)"""

import subprocess
import sys

import pytest

from sparrow_megatron.cli import ui
from sparrow_megatron.errors import UserError
from sparrow_megatron.loop import tracking


def test_ui_targets(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        ui.resolve(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a run directory"):
        ui.resolve(tmp_path)
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert ui.resolve(tmp_path) == ((tmp_path / "mlflow.db").resolve(), None)
    run = tmp_path / "remote"
    run.mkdir()
    (run / tracking.RUN_ID_FILE).write_text(
        '{"run_id": "abc", "uri": "http://mlflow.example:5000", "experiment_id": "7"}\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "sparrow_megatron.cli.main", "ui", str(run)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout.strip()
        == "run: http://mlflow.example:5000/#/experiments/7/runs/abc?workflowType=machine_learning"
    )
