"""Judges for the judge-pool tests, importable by the pool's spawned processes (no pytest import)."""

import os
import time
import uuid
from pathlib import Path


def rendezvous(folder: str, workers: int, total: int) -> float:
    """Hold until `workers` judgements are in progress at once (or all `total` have started, for the
    tail); return the most seen in progress at once. A pool running them one after another never
    reaches `workers` and returns 1 after the deadline."""
    me = uuid.uuid4().hex
    active = Path(folder, "active-" + me)
    active.touch()
    Path(folder, "started-" + me).touch()
    seen, deadline = 0, time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            names = os.listdir(folder)
            now = sum(n.startswith("active-") for n in names)
            seen = max(seen, now)
            if now >= workers or sum(n.startswith("started-") for n in names) >= total:
                break
            time.sleep(0.01)
    finally:
        active.unlink()
    return float(seen)


def hang(_: str) -> float:
    time.sleep(3600)
    return 1.0


def crash(_: str) -> float:
    raise ValueError("the judge tripped on this output")


def die(_: str) -> float:
    os._exit(3)


def pid(_: str) -> float:
    return float(os.getpid())
