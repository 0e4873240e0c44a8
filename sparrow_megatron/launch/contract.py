"""The trainer's side of the job's env contract: where the rollout engines are, and waiting for them.

The batch script exports the rollout nodes' addresses (`SPARROW_ROLLOUT_ADDRS`, one per node, in the
order Slurm lists the group's nodes) and the static `SPARROW_ENGINE_BASE_PORT` and
`SPARROW_ENGINES_PER_NODE`; node k serves engine i on `base_port + i` at its address (the rollout
command binds exactly there). `rollout.urls=env` in a job config resolves to those URLs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import httpx

from sparrow_megatron.errors import UserError

log = logging.getLogger("sparrow.launch")

FROM_ENV = "env"
# The time-limit handshake in the run directory: the batch script's USR1 trap writes STOP_FILE, the
# trainer commits a checkpoint at its next step boundary and writes SAVED_FILE (the step), the trap's
# watcher then requeues the job (loop/preempt.py, launch/build.py).
STOP_FILE = ".sparrow_stop"
SAVED_FILE = ".sparrow_saved"


def rollout_urls_from_env(env: Mapping[str, str] | None = None) -> list[str]:
    """Every engine URL of the rollout group, node-major: [node0:base, node0:base+1, ..., node1:base, ...]."""
    env = os.environ if env is None else env
    addrs = env.get("SPARROW_ROLLOUT_ADDRS") or env.get("SPARROW_ROLLOUT_HOSTS")
    missing = [
        name
        for name, value in [
            ("SPARROW_ROLLOUT_ADDRS", addrs),
            ("SPARROW_ENGINE_BASE_PORT", env.get("SPARROW_ENGINE_BASE_PORT")),
            ("SPARROW_ENGINES_PER_NODE", env.get("SPARROW_ENGINES_PER_NODE")),
        ]
        if not value
    ]
    if missing:
        raise UserError(
            f"field 'rollout.urls': 'env' needs the Slurm job's environment, but {', '.join(missing)} "
            "is not set (run through `sparrow submit`, or give the URLs)"
        )
    try:
        base, per_node = int(env["SPARROW_ENGINE_BASE_PORT"]), int(env["SPARROW_ENGINES_PER_NODE"])
    except ValueError as err:
        raise UserError(
            f"field 'rollout.urls': malformed engine port/count in the environment: {err}"
        ) from None
    hosts = [h.strip() for h in addrs.split(",") if h.strip()]
    return [f"http://{_bracket(h)}:{base + i}" for h in hosts for i in range(per_node)]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def resolve_rollout_urls(urls: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """`rollout.urls` as the fleet takes them: ["env"] from the job's environment, others as given."""
    if urls == [FROM_ENV]:
        return rollout_urls_from_env(env)
    return [u.rstrip("/") for u in urls]


def wait_for_engines(urls: list[str], timeout_s: float, poll_s: float = 5.0) -> None:
    """Block until every URL answers GET /health with 200. The rollout group starts at the same time as
    the trainer, and SGLang takes from seconds (tiny, idle) to many minutes (14B, busy) to come up."""
    pending = list(urls)
    deadline = time.monotonic() + timeout_s
    last_log = 0.0
    with httpx.Client(timeout=10.0) as client:
        while pending:
            pending = [u for u in pending if not _healthy(client, u)]
            if not pending:
                break
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(
                    f"rollout engines not healthy after {timeout_s:.0f}s: {', '.join(pending)} "
                    "(see the rollout group's log; cluster.rollout_start_timeout_s sets this wait)"
                )
            if now - last_log > 60:
                log.info(
                    "waiting for %d/%d rollout engine(s): %s", len(pending), len(urls), ", ".join(pending)
                )
                last_log = now
            time.sleep(poll_s)
    log.info("all %d rollout engine(s) healthy", len(urls))


def _healthy(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False
