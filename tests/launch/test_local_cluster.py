"""slurm/local_cluster.sh itself: idempotent `up`, every daemon listening on loopback only, fake GPUs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import psutil
import pytest

from tests.launch.conftest import SCRIPT

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
DAEMONS = ["munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd-node1", "slurmd-node2"]


def test_up_is_idempotent_and_everything_listens_on_loopback(local_slurm):
    again = subprocess.run(["bash", str(SCRIPT), "up"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already up" in again.stderr, again.stdout + again.stderr
    state = Path(local_slurm).parent.parent
    listening = []
    for daemon in DAEMONS:
        pid = int((state / "run" / f"{daemon}.pid").read_text())
        for conn in psutil.Process(pid).net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                listening.append((daemon, conn.laddr.ip))
    # munged serves a unix socket only; every TCP listener must be loopback.
    assert {d for d, _ in listening} >= {"mariadbd", "slurmdbd", "slurmctld", "slurmd-node1", "slurmd-node2"}
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening
    status = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    for node in ("node1", "node2"):
        assert re.search(rf"^{node} \S+ gpu:8$", status.stdout, re.M), status.stdout
