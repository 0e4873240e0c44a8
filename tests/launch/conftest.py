"""The real local Slurm (slurm/local_cluster.sh) for `@pytest.mark.slurm` tests: up once per session,
down at the end."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local_cluster.sh"
UNAVAILABLE = 3  # local_cluster.sh: Slurm cannot be installed on this machine


@pytest.fixture(scope="session")
def local_slurm():
    """SLURM_CONF of a running two-node cluster. Skips only when Slurm cannot be installed at all."""
    env = dict(os.environ, CI=os.environ.get("CI", "true"))
    up = subprocess.run(
        ["bash", str(SCRIPT), "up"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    if up.returncode == UNAVAILABLE:
        pytest.skip(f"local Slurm unavailable: {up.stderr.strip().splitlines()[-1]}")
    assert up.returncode == 0, f"local_cluster.sh up failed:\n{up.stdout}\n{up.stderr}"
    conf = subprocess.run(["bash", str(SCRIPT), "env"], capture_output=True, text=True, check=True)
    slurm_conf = conf.stdout.strip().removeprefix("export SLURM_CONF=")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = slurm_conf
    try:
        yield slurm_conf
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run(["bash", str(SCRIPT), "down"], stdin=subprocess.DEVNULL, timeout=300, check=False)
